"""Every real tokenizer family (tests/fixtures/tokenizers) with its own chat template: the masks
of its preference pairs equal an oracle, and a tiny model on its vocabulary trains a few steps of
SFT and of DPO through the real entrypoints.

Pair masks: HH-RLHF pairs (``tests/fixtures/data``, the rows of
``test_real_template_masks``) loaded by ``load_preference_pairs`` (transform ``hh_rlhf``) and
encoded by ``encode_pairs`` with the tokenizer as training loads it (the family's model config:
its special tokens and ``add_bos``; ``model.chat_template: null``, the tokenizer's Jinja
template). Each side's ids must be HF's ``apply_chat_template(prompt + reply, tokenize=True)``
and its completion mask the oracle's (``{% generation %}``-tagged template) mask of the final
assistant turn only: the earlier assistant turns of the prompt are context.

Training: ``train_sft.run`` (the chosen transcripts as multi-turn ``messages``) and
``train_preference.run`` (DPO on the pairs), 5 steps each, in-process from a composed config
(one Accelerator per run, as ``test_trainer_context``), on a tiny random Llama with the family's
vocabulary and tokenizer files (``tiny_model_dir``). ``python -m tests.test_real_families_train``
prints the figures per family (pairs, tokens compared, mismatches; loss after 5 steps).
"""

from __future__ import annotations

import contextlib
import functools
import json
import lzma
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from post_training.data_preference.encode import PairReport, encode_pairs
from post_training.data_preference.pairs import PreferenceSource, load_preference_pairs
from post_training.data_sft.tokenize import ChatEncoder
from post_training.data_sft.training_data import tokenize_options
from post_training.modeling.loading import load_tokenizer
from post_training.utils.config import CONFIGS_DIR

from .real_tokenizers import FAMILIES, tiny_model_dir, tokenizer_dir
from .test_real_template_masks import (
    HH,
    HH_ROWS,
    conversations,
    hh_conversations,
    oracle,
    special_ids,
    tokenizer,
    trained_runs,
)
from .test_real_tokenizers import CONFIG_FAMILY

STEPS = 5
MAX_SEQ_LENGTH = 256
TRAIN_ROWS = 10  # HH-RLHF rows to train on (each a pair; its chosen transcript a conversation)
TRAIN_CHARS = 300

# Family -> its model config (configs/model/<name>.yaml); Qwen3's two configs share the tokens.
MODEL_CONFIG = {family: name for name, family in sorted(CONFIG_FAMILY.items(), reverse=True)}


# ------------------------------------------------------------------------------ data
_KEEP: list[Any] = []  # the temp dir of data_dir(), removed at exit


def training_rows() -> list[int]:
    """Short multi-turn HH-RLHF rows (two Assistant turns or more, each transcript at most
    ``TRAIN_CHARS`` characters, non-empty replies): with the real vocabularies (128k-262k) the LM
    head costs a few ms per token on these CPUs, so the runs train on rows of 70-140 tokens."""
    out = []
    with lzma.open(HH, "rt", encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            row = json.loads(line)
            sides = (row["chosen"], row["rejected"])
            if all(
                s.count("\n\nAssistant:") >= 2
                and len(s) <= TRAIN_CHARS
                and s.rsplit("\n\nAssistant:", 1)[1].strip()
                for s in sides
            ):
                out.append(i)
            if len(out) == TRAIN_ROWS:
                return out
    raise AssertionError(f"only {len(out)} short multi-turn rows in {HH.name}")


@functools.cache
def data_dir() -> Path:
    """A process-wide temp dir (removed at exit): ``hh.jsonl``, the first ``HH_ROWS`` HH-RLHF
    rows; ``train-pairs.jsonl``, the :func:`training_rows`; ``train-messages.jsonl``, their
    chosen transcripts as ``messages``."""
    holder = tempfile.TemporaryDirectory(prefix="real-families-")
    _KEEP.append(holder)
    path = Path(holder.name)
    with lzma.open(HH, "rt", encoding="utf-8") as handle:
        lines = handle.readlines()
    (path / "hh.jsonl").write_text("".join(lines[:HH_ROWS]), encoding="utf-8")
    rows = training_rows()
    (path / "train-pairs.jsonl").write_text("".join(lines[i] for i in rows), encoding="utf-8")
    chats = hh_conversations(max(rows) + 1)
    (path / "train-messages.jsonl").write_text(
        "".join(json.dumps({"messages": chats[2 * i]}) + "\n" for i in rows), encoding="utf-8"
    )
    return path


@functools.cache
def hh_pairs() -> PreferenceSource:
    """The canonical pairs of the first ``HH_ROWS`` rows (line 87's empty reply dropped)."""
    return load_preference_pairs(
        {"path": str(data_dir() / "hh.jsonl"), "transform": "hh_rlhf"}, "hh"
    )


# ------------------------------------------------------------------------------ configs
def model_config(family: str) -> dict[str, Any]:
    """``family``'s model config (``tiny``'s with the tokenizer's special tokens for a family
    without one) with the fixture's tokenizer and its own template (``chat_template: null``)."""
    name = MODEL_CONFIG.get(family)
    cfg = OmegaConf.load(CONFIGS_DIR / "model" / f"{name or 'tiny'}.yaml")
    cfg.model_name_or_path = cfg.tokenizer_name_or_path = str(tokenizer_dir(family))
    cfg.chat_template = None
    if name is None:
        tok = tokenizer(family)
        cfg.special_tokens = {
            **{f"{r}_token": getattr(tok, f"{r}_token") for r in ("bos", "eos", "pad")},
            **{f"{r}_token_id": getattr(tok, f"{r}_token_id") for r in ("bos", "eos", "pad")},
            "add_bos": False,
        }
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


_TOKENIZER_KEYS = ("tokenizer_name_or_path", "special_tokens", "chat_template", "trust_remote_code")


@functools.cache
def _load_tokenizer(key: str) -> Any:
    return load_tokenizer(json.loads(key))


def shared_load_tokenizer(model_cfg: dict[str, Any]) -> Any:
    """``load_tokenizer``, once per tokenizer config in this process (loading a real one takes
    1-7 s here): the pair test and the two runs of a family share one tokenizer."""
    return _load_tokenizer(json.dumps({k: model_cfg.get(k) for k in _TOKENIZER_KEYS}))


def training_tokenizer(family: str) -> Any:
    """The tokenizer as a run of ``family`` loads it (``load_tokenizer``: the config's special
    tokens, the tokenizer's template)."""
    return shared_load_tokenizer(model_config(family))


@functools.cache
def model_dir(family: str) -> Path:
    """A tiny random Llama on ``family``'s vocabulary (its tokenizer files next to it), once
    per process."""
    return tiny_model_dir(family, data_dir() / "models", tokenizer=training_tokenizer(family))


# ------------------------------------------------------------------------------ pair masks
def split_pair(pair: dict[str, np.ndarray]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The chosen and rejected sides of a tokenized pair (``position_ids`` restart at 0)."""
    n = int(np.flatnonzero(pair["position_ids"] == 0)[1])
    keys = ("input_ids", "labels", "completion_mask")
    return (
        {k: pair[k][:n].tolist() for k in keys},
        {k: pair[k][n:].tolist() for k in keys},
    )


@functools.cache
def encoded_pairs(family: str) -> tuple[list[dict[str, np.ndarray]], PairReport]:
    tok = training_tokenizer(family)
    config = {
        "model": model_config(family) | {"max_seq_length": 1 << 20},
        "data": {},
    }
    encoder = ChatEncoder(tok, None, tokenize_options(config))
    source, report = hh_pairs(), PairReport()
    pairs = encode_pairs(source.pairs, encoder, "hh", 1 << 20, report, locate=source.locate)
    return pairs, report


@functools.cache
def pair_references(family: str) -> list[tuple[tuple[list[int], list[int]], ...]]:
    """Per pair, (oracle ids, oracle mask of the final turn) of its chosen and rejected side."""
    index = {json.dumps(c): k for k, c in enumerate(conversations(family))}
    reference = oracle(family)
    out = []
    for row in hh_pairs().pairs:
        sides = []
        for side in ("chosen", "rejected"):
            ids, mask = reference[index[json.dumps(row["prompt"] + row[side])]]
            a, b = trained_runs(mask)[-1]
            sides.append((ids, [int(a <= k < b) for k in range(len(ids))]))
        out.append(tuple(sides))
    return out


def pair_figures(family: str) -> tuple[int, int, int]:
    """(pairs, tokens compared, id or mask mismatches) of ``family``."""
    pairs, _ = encoded_pairs(family)
    tokens = mismatches = 0
    for pair, reference in zip(pairs, pair_references(family), strict=True):
        for got, (ids, mask) in zip(split_pair(pair), reference, strict=True):
            tokens += len(ids)
            if got["input_ids"] != ids:
                mismatches += len(ids)
                continue
            mismatches += sum(a != b for a, b in zip(got["completion_mask"], mask, strict=True))
    return len(pairs), tokens, mismatches


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_masks_equal_the_oracle_of_the_final_turn(family: str) -> None:
    pairs, report = encoded_pairs(family)
    source = hh_pairs()
    assert len(source.pairs) == HH_ROWS - 1 and source.dropped == {"empty_chosen": 1}
    assert report.kept == len(pairs) == len(source.pairs) and not report.dropped
    assert sum(len(r["prompt"]) > 1 for r in source.pairs) >= 40  # earlier assistant turns
    tok, special = training_tokenizer(family), special_ids(family)
    bos = tok.bos_token_id
    for pair, reference in zip(pairs, pair_references(family), strict=True):
        for got, (ids, mask) in zip(split_pair(pair), reference, strict=True):
            assert got["input_ids"] == ids  # == apply_chat_template(prompt + reply)
            assert got["completion_mask"] == mask  # the final reply and its end-of-turn token
            assert got["labels"] == [i if m else -100 for i, m in zip(ids, mask, strict=True)]
            ((_, end),) = trained_runs(got["completion_mask"])
            assert ids[end - 1] in special  # the end-of-turn token is trained ...
            assert not any(got["completion_mask"][end:])  # ... and nothing after it
            if bos is not None:
                assert ids[:2] != [bos, bos]
                if bos != tok.eos_token_id:  # olmo-2's BOS is also the EOS closing its turns
                    assert ids.count(bos) <= 1


# ------------------------------------------------------------------------------ training
def compose_run(config_name: str, overrides: list[str], model: dict[str, Any]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose(config_name, overrides=overrides)
    cfg.model.special_tokens = model["special_tokens"]  # the same, unless the fallback's
    OmegaConf.set_struct(cfg, True)
    return cfg


def run_overrides(family: str, artifacts: Path) -> list[str]:
    """The model config of ``family`` on its tiny model (the tokenizer read from the fixture
    dir, whose files ``tiny_model_dir`` copies next to the model), 5 short steps, no eval."""
    return [
        f"model={MODEL_CONFIG.get(family, 'tiny')}",
        f"artifacts_dir={artifacts}",
        f"model.model_name_or_path={model_dir(family)}",
        f"model.tokenizer_name_or_path={tokenizer_dir(family)}",
        "model.init_from_config=false",
        "model.chat_template=null",
        "model.torch_dtype=float32",
        "model.attn_implementation=sdpa",
        f"model.max_seq_length={MAX_SEQ_LENGTH}",
        "wandb.mode=disabled",
        "tensorboard=false",
        "data.cache=false",
        "data.truncation=truncate",
        "evaluation.at_end=false",
        "training_args.num_train_epochs=null",
        f"training_args.max_steps={STEPS}",
        "training_args.per_device_train_batch_size=1",
        "training_args.gradient_accumulation_steps=1",
        "training_args.logging_steps=1",
        "training_args.eval_strategy=no",
        "training_args.eval_steps=null",
        "training_args.save_steps=1000",
        "dataset.eval=null",
    ]


ENTRYPOINTS = {
    "train_sft": (
        "train-sft",
        "train-messages.jsonl",
        ["dataset.train.transform=messages", "~dataset.train.keep_columns"],
    ),
    "train_preference": (
        "train-preference",
        "train-pairs.jsonl",
        ["trainer=dpo", "dataset.train.transform=hh_rlhf"],
    ),
}


def train(family: str, entrypoint: str, artifacts: Path) -> list[dict[str, Any]]:
    """Run ``entrypoint`` (its ``run``, in-process) on ``family``; the metrics it logged."""
    import importlib

    config_name, data, extra = ENTRYPOINTS[entrypoint]
    overrides = [
        *run_overrides(family, artifacts),
        f"dataset.train.path={data_dir() / data}",
        *extra,
    ]
    cfg = compose_run(config_name, overrides, model_config(family))
    run = importlib.import_module(f"post_training.{entrypoint}").run
    assert run(cfg) == 0
    (run_dir,) = (artifacts / "private" / "outputs" / entrypoint / "dev" / "runs").iterdir()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f"checkpoint-{STEPS}").is_dir()  # the last step's checkpoint
    assert (checkpoints / "final-model" / "model.safetensors").is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_run(entrypoint: str, metrics: list[dict[str, Any]]) -> float:
    """Steps 1-5 logged a finite loss (SFT: on completion tokens; DPO: ln 2 at the first step,
    where the policy is its reference); the last loss."""
    logged = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1)), metrics
    assert all(math.isfinite(m["loss"]) for m in logged), logged
    if entrypoint == "train_sft":
        assert all(m["num_completion_tokens"] > 0 for m in logged), logged
    else:
        assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    return logged[-1]["loss"]


@contextlib.contextmanager
def shared_tokenizers():
    """The runs load their tokenizer through :func:`shared_load_tokenizer`."""
    from post_training.modeling import loading

    original, loading.load_tokenizer = loading.load_tokenizer, shared_load_tokenizer
    try:
        yield
    finally:
        loading.load_tokenizer = original


@pytest.mark.e2e  # real training runs (in-process): outside the fast `-m "not e2e"` subset
@pytest.mark.parametrize("entrypoint", list(ENTRYPOINTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_train_with_the_familys_template(
    family: str, entrypoint: str, tmp_path: Path
) -> None:
    with shared_tokenizers():
        check_run(entrypoint, train(family, entrypoint, tmp_path))


def test_every_family_has_a_model_config() -> None:
    """The special tokens come from the family's model config (the fallback is unused today)."""
    assert set(MODEL_CONFIG) == set(FAMILIES)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp, shared_tokenizers():
        for name in FAMILIES:
            start = time.perf_counter()
            n, tokens, bad = pair_figures(name)
            losses = [check_run(e, train(name, e, Path(tmp) / name / e)) for e in ENTRYPOINTS]
            print(
                f"{name}: {n} pairs, {tokens} tokens compared, {bad} mismatches; loss after "
                f"{STEPS} steps: SFT {losses[0]:.3f}, DPO {losses[1]:.3f} "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
