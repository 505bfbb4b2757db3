"""SFT data-preparation throughput: our pipeline against TRL's, on identical data and tokenizer.

Issue 3's target: tokenize + mask + pack >= 20,000 short chat examples/s in one process on a
2-core machine, and >= 2x TRL's ``SFTTrainer`` dataset preparation on the same data.

What is timed, from a list of conversations (``[{"role", "content"}, ...]``) to packed rows:

- ours: ``ChatEncoder(tokenizer, TEMPLATES["chatml"]).encode`` + ``pack_examples`` (best fit
  decreasing into ``max_seq_length`` rows), with the tokenizers library's Rust thread pool on
  (its default: 2 threads here) and off (``TOKENIZERS_PARALLELISM=false``, one thread);
- ours with ``template=None``: the same, masks from incremental rendering of the tokenizer's
  own Jinja template (the slow path, for models whose format is not in the registry);
- TRL: ``SFTTrainer._prepare_dataset`` on a fresh in-memory ``datasets.Dataset`` with a
  ``messages`` column, ``SFTConfig(assistant_only_loss=True, packing=True,
  packing_strategy="bfd")`` and the tokenizer's chat template replaced by the same chatml format
  with ``{% generation %}`` markers around each assistant reply and its ``<|im_end|>`` (what
  ``assistant_only_loss`` requires). The masks then select exactly our completion tokens: every
  assistant turn's content plus its end-of-turn token. ``_prepare_dataset`` is called unbound
  with the three attributes it reads from the trainer, set as ``SFTTrainer.__init__`` sets them
  (checked against its source at run time), so no model is built.

Too-long chats keep their first ``max_seq_length`` tokens in both (TRL's BFD packing
truncates; ours runs with ``truncation="truncate"``), so both emit the same documents. A
reference line times the Rust ``encode_batch`` alone on the pre-rendered texts: the ceiling
for any pipeline built on this tokenizer.

The pipelines run alternately, ``--repeats`` times; the median wall time is reported (and the
best, less sensitive to other processes). The Dataset is built outside TRL's timing (its input
is a Dataset), datasets' caching is disabled and every map stays in memory, so no repeat reads
a cache. ``dataset_num_proc=1`` makes datasets fork a one-worker pool for every map (pickling
the data both ways); TRL's default ``None`` maps in process, which is faster, so that is what
is timed (``--trl-num-proc`` to change it).

The tokenizer is a byte-level BPE (24k vocabulary) trained here on the synthetic text, with the
chatml special tokens, cached under ``<artifacts>/benchmarks/``. The chat set is seeded:
log-normal word counts (median 40 words per prompt, 60 per reply), 10% multi-turn (2-4 turns),
10% with a system prompt, words drawn from a Zipf law over function words, pseudo-words and
numbers, with punctuation, paragraphs and lists.

Run: ``python -m benchmarks.data_prep [--num-examples N] [--repeats R] [--max-seq-length L]
[--json OUT]``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from post_training.data_sft.packing import pack_examples, packing_efficiency
from post_training.data_sft.templates import ROLES, TEMPLATES, ChatTemplate
from post_training.data_sft.tokenize import ChatEncoder, FilterReport, TokenizeOptions
from post_training.utils.atomic import atomic_dir
from post_training.utils.config import default_artifacts_dir

TARGET_EXAMPLES_PER_S = 20_000
TARGET_RATIO = 2.0
DATA_SEED = 0
# Too-long examples keep their head, as TRL's BFD packing does (our default drops them).
TRUNCATION = "truncate"

# The cached tokenizer: bump the version whenever the recipe below changes.
TOKENIZER_VERSION = "v1"
TOKENIZER_VOCAB_SIZE = 24_000
TOKENIZER_CORPUS_EXAMPLES = 12_000
TOKENIZER_SEED = 1234
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>"]

# The trainer attributes `SFTTrainer._prepare_dataset` reads; checked against its source.
TRL_SELF_ATTRIBUTES = frozenset({"_tokenizer", "chat_template", "completion_only_loss"})

# --------------------------------------------------------------------------------------------
# Synthetic chat data
# --------------------------------------------------------------------------------------------

_FUNCTION_WORDS = (
    "the of and to a in is it you that was for on are with as I his they be at one have this "
    "from or had by not but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them would like so these "
    "her make see him two has look more day could go come did no most people my over know than "
    "first who may down been now find any new work part take get place made where after back "
    "only little just also well very even because good through much before must right too mean "
    "same here why ask should while another few between each under never always both also"
)
FUNCTION_WORDS = tuple(_FUNCTION_WORDS.split())
ONSETS = "b c d f g h j k l m n p r s t v w z br cl cr dr fl gr pl pr sh st str th tr ch sp sc"
ONSETS = ["", *ONSETS.split()]
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y")
CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "nt", "st", "ng", "ck", "rt", "ll", "x")
# After-word punctuation (with the whitespace that follows it) and its probability.
PUNCTUATION = (" ", ", ", ". ", "? ", ".\n\n", ":\n- ", "\n- ")
PUNCTUATION_P = (0.862, 0.06, 0.055, 0.008, 0.011, 0.002, 0.002)
SENTENCE_ENDS = (2, 3, 4, 5, 6)  # the next word is capitalised
LEXICON_SIZE = 40_000
SYLLABLES_P = (0.4, 0.38, 0.17, 0.05)
ZIPF_EXPONENT = 1.05
# Words per message: log-normal (median, sigma), capped (these are short chats).
WORDS = {"system": (20, 0.7), "user": (40, 0.8), "assistant": (60, 0.8)}
MAX_WORDS = 500
MULTI_TURN_P = 0.10
SYSTEM_P = 0.10


def _lexicon(rng: np.random.Generator, size: int = LEXICON_SIZE) -> list[str]:
    """Words by decreasing frequency: function words, then pseudo-words (shorter ones more
    frequent) with numbers spread among them."""
    candidates = 2 * size
    syllables = [
        np.asarray(part, dtype=object)[rng.integers(len(part), size=(candidates, 4))]
        for part in (ONSETS, VOWELS, CODAS)
    ]
    syllables = syllables[0] + syllables[1] + syllables[2]
    n_syllables = rng.choice(4, size=candidates, p=SYLLABLES_P) + 1
    pseudo = [
        "".join(row[:n]) for row, n in zip(syllables.tolist(), n_syllables.tolist(), strict=True)
    ]
    head = list(dict.fromkeys(FUNCTION_WORDS))
    rest = list(dict.fromkeys(w for w in pseudo if w not in set(head)))[: size - len(head)]
    rest.sort(key=len)  # stable: ties keep their random order
    numbers = [str(n) for n in range(100)] + [str(y) for y in range(1950, 2030)]
    numbers += [str(n) for n in rng.integers(100, 100_000, 300).tolist()]
    numbers += [f"{x:.2f}" for x in (rng.random(200) * 100).tolist()]
    for number, rank in zip(
        numbers, np.sort(rng.integers(0, len(rest), len(numbers))).tolist(), strict=True
    ):
        rest.insert(rank, number)
    return (head + rest)[:size]


def _word_counts(rng: np.random.Generator, role: str, size: int) -> np.ndarray:
    median, sigma = WORDS[role]
    counts = np.rint(rng.lognormal(np.log(median), sigma, size))
    return np.clip(counts, 1, MAX_WORDS).astype(np.int64)


def synthetic_conversations(num_examples: int, seed: int) -> list[list[dict[str, str]]]:
    """A fixed (seeded) set of short chats; see the module docstring."""
    rng = np.random.default_rng(seed)
    lexicon = _lexicon(np.random.default_rng(seed + 7))
    # Conversation structure: roles of every message, in order.
    turns = np.where(rng.random(num_examples) < MULTI_TURN_P, rng.integers(2, 5, num_examples), 1)
    system = rng.random(num_examples) < SYSTEM_P
    roles: list[str] = []
    sizes: list[int] = []
    for n, has_system in zip(turns.tolist(), system.tolist(), strict=True):
        sizes.append(2 * n + has_system)
        if has_system:
            roles.append("system")
        roles += ["user", "assistant"] * n
    role_array = np.asarray(roles)
    counts = np.empty(len(roles), dtype=np.int64)
    for role in WORDS:
        where = role_array == role
        counts[where] = _word_counts(rng, role, int(where.sum()))
    # Words (Zipf-Mandelbrot over the lexicon) and the punctuation after each.
    total = int(counts.sum())
    ranks = np.arange(len(lexicon), dtype=np.float64)
    cdf = np.cumsum(1.0 / (ranks + 2.7) ** ZIPF_EXPONENT)
    word = np.searchsorted(cdf / cdf[-1], rng.random(total))
    word = np.minimum(word, len(lexicon) - 1)
    punct_cdf = np.cumsum(PUNCTUATION_P)
    punct = np.minimum(np.searchsorted(punct_cdf / punct_cdf[-1], rng.random(total)), 6)
    ends = np.cumsum(counts) - 1
    starts = ends - counts + 1
    # Messages end with a full stop, prompts with a question a third of the time.
    question = (role_array == "user") & (rng.random(len(roles)) < 1 / 3)
    punct[ends] = np.where(question, 3, 2)
    capital = np.zeros(total, dtype=np.int64)
    capital[1:] = np.isin(punct[:-1], SENTENCE_ENDS)
    capital[starts] = 1
    n_punct = len(PUNCTUATION)
    table = [
        (w[:1].upper() + w[1:] if cap else w) + p
        for w in lexicon
        for cap in (0, 1)
        for p in PUNCTUATION
    ]
    codes = (word * 2 + capital) * n_punct + punct
    pieces = list(map(table.__getitem__, codes.tolist()))
    texts = [
        "".join(pieces[a : b + 1]).rstrip()
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]
    conversations = []
    position = 0
    for size in sizes:
        conversations.append(
            [{"role": roles[i], "content": texts[i]} for i in range(position, position + size)]
        )
        position += size
    return conversations


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def tokenizer_dir(artifacts_dir: str | None = None) -> Path:
    root = Path(artifacts_dir or default_artifacts_dir()) / "benchmarks"
    return root / f"data-prep-bpe{TOKENIZER_VOCAB_SIZE // 1000}k-{TOKENIZER_VERSION}"


def build_tokenizer(artifacts_dir: str | None = None) -> Path:
    """Train (once) and cache the byte-level BPE; returns its directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    target = tokenizer_dir(artifacts_dir)
    if (target / "tokenizer.json").exists():
        return target
    corpus = [
        m["content"]
        for c in synthetic_conversations(TOKENIZER_CORPUS_EXAMPLES, TOKENIZER_SEED)
        for m in c
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=32_768,
    )
    fast.chat_template = TEMPLATES["chatml"].bind(None, EOS_TOKEN).to_jinja()
    with atomic_dir(target, if_exists="keep") as staging:  # a concurrent build may win the race
        fast.save_pretrained(staging)
    return target


def load_tokenizer(directory: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(directory)


def generation_tagged_jinja(template: ChatTemplate) -> str:
    """``template`` as Jinja with ``{% generation %}`` around every trained part (an assistant
    reply and its end-of-turn suffix), for ``return_assistant_tokens_mask`` / TRL's
    ``assistant_only_loss``. Renders exactly like :meth:`ChatTemplate.to_jinja` (checked)."""
    if template.system != "role" or template.default_system is not None:
        raise ValueError(f"template {template.name!r}: only system='role' formats are supported")
    lit = json.dumps
    out = [
        "{%- set ns = namespace(pending='') -%}",
        "{{- " + lit(template.bos) + " -}}",
        "{%- for message in messages -%}{%- set role = message['role'] -%}",
        "{%- if false -%}",
    ]
    for role in ROLES:
        fmt = template.roles.get(role)
        if fmt is None:
            out.append("{%- elif role == " + lit(role) + " -%}")
            continue
        body = "{{- message['content'] + " + lit(fmt.suffix) + " -}}"
        if fmt.train:
            body = "{%- generation -%}" + body + "{%- endgeneration -%}"
        out.append(
            "{%- elif role == " + lit(role) + " -%}"
            "{{- ns.pending + "
            + lit(fmt.prefix)
            + " -}}"
            + body
            + "{%- set ns.pending = "
            + lit(template.separator + fmt.after)
            + " -%}"
        )
    out += [
        "{%- else -%}{{- raise_exception('Unknown role: ' + role) -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- ns.pending + "
        + lit(template.gen_prefix)
        + " -}}{%- endif -%}",
    ]
    return "".join(out)


# --------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------


@contextmanager
def tokenizers_parallelism(enabled: bool):
    """The Rust tokenizer's thread pool on / off (read by the library at every batch call)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def run_ours(
    tokenizer: Any, template: ChatTemplate | None, conversations: list, max_seq_length: int
) -> dict[str, Any]:
    encoder = ChatEncoder(
        tokenizer, template, TokenizeOptions(max_seq_length, truncation=TRUNCATION)
    )
    report = FilterReport()
    examples, _ = encoder.encode(conversations, "bench", report)
    packed, _ = pack_examples(examples, max_seq_length)
    return {"examples": examples, "packed": packed, "report": report}


def summarize_ours(out: dict[str, Any], max_seq_length: int) -> dict[str, Any]:
    report: FilterReport = out["report"]
    return {
        "kept": report.kept,
        "dropped": dict(report.dropped),
        "truncated": report.truncated,
        "tokens": int(sum(len(e["input_ids"]) for e in out["examples"])),
        "completion_tokens": int(sum(int(e["completion_mask"].sum()) for e in out["examples"])),
        "packed_rows": len(out["packed"]),
        "packing_efficiency": packing_efficiency(out["packed"], max_seq_length),
    }


def trl_config(max_seq_length: int, packing: bool, num_proc: int | None, output_dir: str) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        assistant_only_loss=True,
        packing=packing,
        packing_strategy="bfd",
        max_length=max_seq_length,
        dataset_num_proc=num_proc,
        report_to="none",
        bf16=False,  # no GPU needed: only the data preparation runs
    )


def trl_self(tokenizer: Any, args: Any, sample: dict[str, Any]) -> SimpleNamespace:
    """The trainer attributes ``_prepare_dataset`` reads, set as ``SFTTrainer.__init__`` does."""
    from trl import SFTTrainer
    from trl.trainer import sft_trainer

    used = set(re.findall(r"self\.(\w+)", inspect.getsource(SFTTrainer._prepare_dataset)))
    if used - TRL_SELF_ATTRIBUTES:
        raise RuntimeError(
            f"SFTTrainer._prepare_dataset now reads self.{sorted(used - TRL_SELF_ATTRIBUTES)}: "
            "update benchmarks/data_prep.py:trl_self"
        )
    if args.assistant_only_loss and not sft_trainer.has_generation_markers(tokenizer.chat_template):
        chat_template = sft_trainer.get_training_chat_template(tokenizer)
    else:
        chat_template = None
    if args.completion_only_loss is None:
        completion_only_loss = "prompt" in sample and "completion" in sample
    else:
        completion_only_loss = args.completion_only_loss
    return SimpleNamespace(
        _tokenizer=tokenizer, chat_template=chat_template, completion_only_loss=completion_only_loss
    )


def trl_dataset(conversations: list, extra: dict[str, list] | None = None) -> Any:
    from datasets import Dataset

    columns = {"messages": conversations, **(extra or {})}
    return Dataset.from_dict(columns)


def run_trl(tokenizer: Any, dataset: Any, args: Any) -> Any:
    from trl import SFTTrainer

    self = trl_self(tokenizer, args, dataset[0])
    return SFTTrainer._prepare_dataset(self, dataset, tokenizer, args, args.packing, None, "train")


def summarize_trl(out: Any, max_seq_length: int) -> dict[str, Any]:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(out.data.column("input_ids"))
    tokens = int(pc.sum(lengths).as_py() or 0)
    seq_lengths = out.data.column("seq_lengths")
    return {
        "kept": int(pc.sum(pc.list_value_length(seq_lengths)).as_py() or 0),
        "tokens": tokens,
        "packed_rows": len(out),
        "packing_efficiency": tokens / (max_seq_length * len(out)) if len(out) else 0.0,
        "cache_files": len(out.cache_files),
    }


# --------------------------------------------------------------------------------------------
# Mask equivalence on a sample
# --------------------------------------------------------------------------------------------


def mask_agreement(
    tokenizer: Any,
    trl_tokenizer: Any,
    conversations: list,
    max_seq_length: int,
    sample_size: int,
    output_dir: str,
) -> dict[str, Any]:
    """Our unpacked completion masks against TRL's assistant masks (as ``labels != -100``)."""
    rng = np.random.default_rng(DATA_SEED + 1)
    size = min(sample_size, len(conversations))
    rows = np.sort(rng.choice(len(conversations), size, replace=False)).tolist()
    sample = [conversations[i] for i in rows]

    # The three renderings of the format agree (registry, its Jinja, the generation-tagged one).
    bound = TEMPLATES["chatml"].bind(tokenizer.bos_token, tokenizer.eos_token)
    render_mismatch = 0
    for messages in sample:
        text = bound.render(messages)[0]
        plain = tokenizer.apply_chat_template(messages, tokenize=False)
        tagged = trl_tokenizer.apply_chat_template(messages, tokenize=False)
        render_mismatch += int(not text == plain == tagged)

    ours = ChatEncoder(
        tokenizer, TEMPLATES["chatml"], TokenizeOptions(max_seq_length, truncation=TRUNCATION)
    )
    ours_examples, ours_index = ours.encode(sample, "sample", FilterReport())
    jinja = ChatEncoder(tokenizer, None, TokenizeOptions(max_seq_length, truncation=TRUNCATION))
    jinja_examples, jinja_index = jinja.encode(sample, "sample", FilterReport())
    by_row = {rows[i]: e for i, e in zip(ours_index, ours_examples, strict=True)}
    jinja_by_row = {rows[i]: e for i, e in zip(jinja_index, jinja_examples, strict=True)}

    args = trl_config(max_seq_length, packing=False, num_proc=None, output_dir=output_dir)
    trl_out = run_trl(trl_tokenizer, trl_dataset(sample, {"row": rows}), args)
    trl_by_row = {
        row: (ids, labels)
        for row, ids, labels in zip(
            trl_out["row"], trl_out["input_ids"], trl_out["labels"], strict=True
        )
    }

    compared = ids_equal = exact = tokens = tokens_agree = jinja_equal = 0
    differences: list[str] = []
    for row in rows:
        if row not in by_row or row not in trl_by_row:
            continue
        compared += 1
        example = by_row[row]
        ours_ids = example["input_ids"].tolist()
        ours_mask = example["completion_mask"].tolist()
        trl_ids, trl_labels = trl_by_row[row]
        trl_mask = [int(label != -100) for label in trl_labels]
        if row in jinja_by_row:
            other = jinja_by_row[row]
            jinja_equal += int(
                np.array_equal(other["input_ids"], example["input_ids"])
                and np.array_equal(other["completion_mask"], example["completion_mask"])
            )
        if ours_ids != trl_ids:
            if len(differences) < 5:
                differences.append(f"row {row}: input_ids differ")
            tokens += max(len(ours_ids), len(trl_ids))
            continue
        ids_equal += 1
        agree = sum(a == b for a, b in zip(ours_mask, trl_mask, strict=True))
        tokens += len(ours_ids)
        tokens_agree += agree
        if agree == len(ours_ids):
            exact += 1
        elif len(differences) < 5:
            where = [i for i, (a, b) in enumerate(zip(ours_mask, trl_mask, strict=True)) if a != b]
            pieces = [repr(tokenizer.decode([ours_ids[i]])) for i in where[:5]]
            differences.append(f"row {row}: masks differ at tokens {where[:5]} ({pieces})")
    return {
        "sample": size,
        "compared": compared,
        "render_mismatches": render_mismatch,
        "input_ids_equal_pct": 100.0 * ids_equal / compared if compared else 0.0,
        "examples_exact_pct": 100.0 * exact / compared if compared else 0.0,
        "tokens_agree_pct": 100.0 * tokens_agree / tokens if tokens else 0.0,
        "tokens": tokens,
        "ours_jinja_equal_pct": 100.0 * jinja_equal / compared if compared else 0.0,
        "differences": differences,
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """One timed line: ``run(prepared)``, where ``prepare()`` (untimed) builds its input."""

    label: str
    run: Callable[[Any], Any]
    summarize: Callable[[Any], dict[str, Any]]
    prepare: Callable[[], Any] = lambda: None
    threads: bool = True  # the Rust tokenizer's thread pool
    compare: bool = True  # a pipeline (ratio against TRL), not a reference line


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _quiet() -> None:
    import datasets
    import transformers

    datasets.disable_caching()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def data_stats(conversations: list, tokenizer: Any) -> dict[str, Any]:
    turns = np.array([sum(m["role"] == "assistant" for m in c) for c in conversations])
    system = np.array([c[0]["role"] == "system" for c in conversations])
    words = {
        role: np.array(
            [len(m["content"].split()) for c in conversations for m in c if m["role"] == role]
        )
        for role in WORDS
    }
    return {
        "examples": len(conversations),
        "multi_turn_pct": 100.0 * float((turns > 1).mean()),
        "system_prompt_pct": 100.0 * float(system.mean()),
        "words_median": {r: float(np.median(w)) for r, w in words.items() if len(w)},
        "words_mean": {r: float(np.mean(w)) for r, w in words.items() if len(w)},
        "vocab_size": len(tokenizer),
    }


def run_benchmark(
    num_examples: int,
    repeats: int,
    max_seq_length: int,
    trl_num_proc: int | None = None,
    sample_size: int = 200,
    artifacts_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the inputs, check the masks, time every pipeline; the results as a dict."""
    import datasets
    import tokenizers
    import transformers
    import trl

    log = log or functools.partial(print, flush=True)
    _quiet()
    started = time.perf_counter()
    directory = build_tokenizer(artifacts_dir)
    tokenizer = load_tokenizer(directory)
    trl_tokenizer = load_tokenizer(directory)
    chatml = TEMPLATES["chatml"]
    trl_tokenizer.chat_template = generation_tagged_jinja(
        chatml.bind(tokenizer.bos_token, tokenizer.eos_token)
    )
    log(f"tokenizer: {directory} ({len(tokenizer)} tokens), {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    conversations = synthetic_conversations(num_examples, DATA_SEED)
    log(f"data: {num_examples} conversations, generated in {time.perf_counter() - started:.1f}s")

    output_dir = tempfile.mkdtemp(prefix="data-prep-bench-")
    try:
        agreement = mask_agreement(
            tokenizer, trl_tokenizer, conversations, max_seq_length, sample_size, output_dir
        )
        log(
            f"mask agreement on {agreement['compared']} examples: tokens "
            f"{agreement['tokens_agree_pct']:.2f}%, examples {agreement['examples_exact_pct']:.1f}%"
        )
        args = trl_config(max_seq_length, True, trl_num_proc, output_dir)
        bound = chatml.bind(tokenizer.bos_token, tokenizer.eos_token)
        backend = tokenizer.backend_tokenizer

        def ours(template: ChatTemplate | None) -> Callable[[Any], Any]:
            return lambda _: run_ours(tokenizer, template, conversations, max_seq_length)

        def summarize(out: Any) -> dict[str, Any]:
            return summarize_ours(out, max_seq_length)

        pipelines = {
            "ours": Pipeline("ours (registry chatml, 2 threads)", ours(chatml), summarize),
            "ours_1thread": Pipeline(
                "ours (registry chatml, 1 thread)", ours(chatml), summarize, threads=False
            ),
            "ours_jinja": Pipeline("ours (tokenizer Jinja, 2 threads)", ours(None), summarize),
            "trl": Pipeline(
                "TRL SFTTrainer._prepare_dataset",
                lambda dataset: run_trl(trl_tokenizer, dataset, args),
                lambda out: summarize_trl(out, max_seq_length),
                prepare=lambda: trl_dataset(conversations),
            ),
            # Reference: the Rust tokenizer alone on the rendered texts (rendering untimed).
            "tokenize_only": Pipeline(
                "ref: Rust encode_batch only, 2 threads",
                lambda texts: backend.encode_batch(texts, add_special_tokens=False),
                lambda out: {"tokens": sum(len(e.ids) for e in out), "kept": len(out)},
                prepare=lambda: [bound.render(m)[0] for m in conversations],
                compare=False,
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in pipelines}
        cpu: dict[str, list[float]] = {name: [] for name in pipelines}
        prepare_s: dict[str, list[float]] = {name: [] for name in pipelines}
        summaries: dict[str, dict[str, Any]] = {}
        load_log = [_load()]
        for repeat in range(repeats):
            for name, pipeline in pipelines.items():
                prepared, seconds, _ = _timed(pipeline.prepare)
                prepare_s[name].append(seconds)
                with tokenizers_parallelism(pipeline.threads):
                    out, wall, cpu_s = _timed(lambda p=pipeline, x=prepared: p.run(x))
                times[name].append(wall)
                cpu[name].append(cpu_s)
                if repeat == 0:
                    summaries[name] = pipeline.summarize(out)
                del out, prepared
                log(f"repeat {repeat + 1}/{repeats} {name}: {wall:.2f}s (cpu {cpu_s:.2f}s)")
            load_log.append(_load())
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)

    results = {}
    for name, pipeline in pipelines.items():
        median = statistics.median(times[name])
        results[name] = {
            "label": pipeline.label,
            **summaries[name],
            "times_s": [round(t, 4) for t in times[name]],
            "cpu_s": [round(t, 4) for t in cpu[name]],
            "untimed_prepare_s": round(statistics.median(prepare_s[name]), 4),
            "median_s": median,
            "examples_per_s": num_examples / median,
            "tokens_per_s": summaries[name]["tokens"] / median,
            # Less sensitive to other processes on the machine than the median:
            "best_examples_per_s": num_examples / min(times[name]),
            "median_cpu_s": statistics.median(cpu[name]),
        }
    trl_rate = results["trl"]["examples_per_s"]
    ratios = {
        name: results[name]["examples_per_s"] / trl_rate
        for name, pipeline in pipelines.items()
        if pipeline.compare and name != "trl"
    }
    return {
        "command": None,
        "config": {
            "num_examples": num_examples,
            "repeats": repeats,
            "max_seq_length": max_seq_length,
            "data_seed": DATA_SEED,
            "trl": {
                "function": "SFTTrainer._prepare_dataset, unbound (self: "
                + ", ".join(sorted(TRL_SELF_ATTRIBUTES))
                + ")",
                "dataset": "Dataset.from_dict({'messages': ...}) in memory, built untimed",
                "sft_config": {
                    "assistant_only_loss": True,
                    "completion_only_loss": None,
                    "packing": True,
                    "packing_strategy": "bfd",
                    "max_length": max_seq_length,
                    "dataset_num_proc": trl_num_proc,
                    "shuffle_dataset": args.shuffle_dataset,
                },
                "chat_template": "chatml + {% generation %} around assistant content+<|im_end|>",
                "stop_token_trained": _stop_token_trained(trl_tokenizer),
            },
            "ours": {
                "template": "TEMPLATES['chatml'] (ours), the tokenizer's Jinja (ours_jinja)",
                "truncation": TRUNCATION,
                "packing": "best fit decreasing over the whole set",
            },
            "tokenizer": str(directory),
            "tokenizer_vocab_size": len(tokenizer),
            "versions": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "tokenizers": tokenizers.__version__,
                "transformers": transformers.__version__,
                "datasets": datasets.__version__,
                "trl": trl.__version__,
            },
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_1_5_15": load_log,
            "platform": platform.platform(),
        },
        "data": data_stats(conversations, tokenizer),
        "results": results,
        "ratio_vs_trl": ratios,
        "mask_agreement": agreement,
        "targets": {
            "examples_per_s": TARGET_EXAMPLES_PER_S,
            "ratio": TARGET_RATIO,
            "examples_per_s_met": results["ours"]["examples_per_s"] >= TARGET_EXAMPLES_PER_S,
            "ratio_met": ratios["ours"] >= TARGET_RATIO,
        },
    }


def _stop_token_trained(tokenizer: Any) -> bool:
    from trl.trainer import sft_trainer

    return bool(sft_trainer.is_chat_template_stop_token_trained(tokenizer))


def format_table(result: dict[str, Any]) -> str:
    header = (
        f"{'pipeline':40} {'examples/s':>10} {'tokens/s':>10} {'median s':>8} {'cpu s':>6} "
        f"{'best ex/s':>9} {'kept':>6} {'rows':>5} {'pack eff':>8} {'vs TRL':>6}"
    )
    lines = [header, "-" * len(header)]
    for name, r in result["results"].items():
        ratio = result["ratio_vs_trl"].get(name, 1.0 if name == "trl" else None)
        rows = r.get("packed_rows")
        efficiency = r.get("packing_efficiency")
        lines.append(
            f"{r['label']:40} {r['examples_per_s']:10,.0f} {r['tokens_per_s']:10,.0f} "
            f"{r['median_s']:8.3f} {r['median_cpu_s']:6.1f} {r['best_examples_per_s']:9,.0f} "
            f"{r['kept']:6d} {'-' if rows is None else rows:>5} "
            f"{'-' if efficiency is None else f'{efficiency:.2%}':>8} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>6}"
        )
    agreement = result["mask_agreement"]
    config = result["config"]
    data = result["data"]
    lines += [
        "",
        f"N={config['num_examples']:,} chats ({data['multi_turn_pct']:.1f}% multi-turn, "
        f"{data['system_prompt_pct']:.1f}% with a system prompt; median words: "
        + ", ".join(f"{k} {v:.0f}" for k, v in data["words_median"].items())
        + f"), BPE vocab {data['vocab_size']:,}, max_seq_length={config['max_seq_length']}, "
        f"median of {config['repeats']}",
        f"masks (ours vs TRL assistant_only_loss labels, {agreement['compared']} examples): "
        f"tokens {agreement['tokens_agree_pct']:.2f}% equal, examples "
        f"{agreement['examples_exact_pct']:.1f}% identical, input_ids "
        f"{agreement['input_ids_equal_pct']:.1f}% identical; ours-jinja = ours on "
        f"{agreement['ours_jinja_equal_pct']:.1f}%",
        f"load average (1/5/15 min) at start and after each repeat: "
        f"{result['machine']['load_avg_1_5_15']} on {result['machine']['cpu_count']} CPUs",
        f"targets: >= {TARGET_EXAMPLES_PER_S:,} examples/s "
        f"{'met' if result['targets']['examples_per_s_met'] else 'NOT met'}; "
        f">= {TARGET_RATIO:.0f}x TRL {'met' if result['targets']['ratio_met'] else 'NOT met'}",
    ]
    lines += [f"  difference: {d}" for d in agreement["differences"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data_prep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--num-examples", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument(
        "--trl-num-proc",
        type=int,
        default=None,
        help="SFTConfig.dataset_num_proc (default None, TRL's default: maps in process)",
    )
    parser.add_argument("--sample-size", type=int, default=200, help="chats in the mask check")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    result = run_benchmark(
        args.num_examples, args.repeats, args.max_seq_length, args.trl_num_proc, args.sample_size
    )
    result["command"] = " ".join(["python -m benchmarks.data_prep", *argv])
    print()
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
