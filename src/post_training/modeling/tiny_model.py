"""Builds the files of the tiny default model: a char-level tokenizer and a small Llama config.

The tokenizer has one token per character of :data:`post_training.data_sft.tiny_tasks.ALPHABET`
plus a few special tokens, and a chat template::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

``<|end|>`` closes every turn and is the EOS token, so generation stops at the end of the
assistant turn. Only the config and tokenizer are written, no weights: the model is built at run
time with ``AutoModelForCausalLM.from_config`` from a fixed seed.

Regenerate the committed files with::

    python -m post_training.modeling.tiny_model
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from post_training.data_sft.tiny_tasks import ALPHABET

# --- Tokenizer knobs --------------------------------------------------------------------------

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
"""Chat role -> marker token that opens a turn of that role."""

SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    *ROLE_TOKENS.values(),
)
"""Special tokens, at ids ``0..len(SPECIAL_TOKENS) - 1`` in this order."""

MODEL_MAX_LENGTH = 256
"""Maximum sequence length of the tokenizer and of the model positions."""

VOCAB_MULTIPLE = 8
"""The model's vocabulary size is the tokenizer size rounded up to a multiple of this."""

CHAT_TEMPLATE = (
    "{{ '" + BOS_TOKEN + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + EOS_TOKEN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}"
)
"""Jinja chat template: BOS once, then ``<|role|>content<|end|>`` per message."""

# --- Model knobs ------------------------------------------------------------------------------

HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 384
NUM_HIDDEN_LAYERS = 4
NUM_ATTENTION_HEADS = 4
NUM_KEY_VALUE_HEADS = 2
ROPE_THETA = 10000.0
INITIALIZER_RANGE = 0.02

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-llama"
"""Where the committed config and tokenizer live."""

_VOLATILE_KEYS = ("transformers_version",)
"""Keys removed from written JSON files so the committed files do not change on upgrades."""


def build_backend_tokenizer() -> Tokenizer:
    """The ``tokenizers`` char-level tokenizer: one WordLevel token per ``ALPHABET`` char."""
    if len(set(ALPHABET)) != len(ALPHABET):
        raise ValueError("ALPHABET has duplicate characters")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(ALPHABET)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character (spaces included) becomes its own piece; decoding concatenates them.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The transformers tokenizer with special tokens, max length and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def padded_vocab_size(tokenizer_size: int) -> int:
    """``tokenizer_size`` rounded up to a multiple of ``VOCAB_MULTIPLE``."""
    return -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The small Llama config matching ``tokenizer``."""
    return LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_HIDDEN_LAYERS,
        num_attention_heads=NUM_ATTENTION_HEADS,
        num_key_value_heads=NUM_KEY_VALUE_HEADS,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Generation defaults: stop at ``<|end|>``, pad with ``<|pad|>``."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _canonicalize_json(path: Path) -> None:
    """Rewrites a JSON file without volatile keys (key order kept), with a final newline."""
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        for key in _VOLATILE_KEYS:
            data.pop(key, None)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8", newline="\n")


def build(output_dir: Path = DEFAULT_OUTPUT_DIR) -> list[Path]:
    """Writes config, generation config and tokenizer files (no weights) into ``output_dir``.

    Writing is deterministic (building twice gives byte-identical files); the JSON files are
    rewritten without ``transformers_version`` so that they do not change on upgrades.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    paths = {Path(p) for p in tokenizer.save_pretrained(output_dir)}
    build_config(tokenizer).save_pretrained(output_dir)
    build_generation_config(tokenizer).save_pretrained(output_dir)
    paths |= {output_dir / "config.json", output_dir / "generation_config.json"}
    for path in paths:
        if path.suffix == ".json":
            _canonicalize_json(path)
    return sorted(paths)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: writes the tiny model's files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args(argv)
    for path in build(args.output_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
