"""A small byte-level BPE tokenizer trained locally (no network): a realistic subword tokenizer
whose merges can cross template boundaries, unlike the tiny model's char-level one."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
]

CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "System: You are a helpful assistant.\n\nUser: What is 2+2?\n\nAssistant: 4",
    "[INST] Sort the digits 3142 [/INST] 1234",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "Reverse the word 'banana' -> ananab. Count the letter a in banana: 3.",
]


@functools.cache
def bpe_tokenizer_dir() -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    directory = Path(tempfile.mkdtemp(prefix="bpe-tokenizer-"))
    fast.save_pretrained(directory)
    return directory


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(bpe_tokenizer_dir())
