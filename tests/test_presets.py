"""Dataset presets (``configs/dataset/<name>.yaml``) for the common public SFT and preference
datasets, each checked on a real sample of its layout (``tests/fixtures/data/``, provenance in its
README.md):

* every preset composes with its entrypoint and validates, names its Hub dataset and splits, and
  a preset on free-form chat data turns the end-of-run exact match off by default;
* pointed at its sample (``dataset.train.path``, and the eval path or a one-row ``from_train``),
  every preset loads in process: the canonical rows are what its header comment says becomes
  prompt and completion, and ``data_inspect`` shows them with the trained tokens marked;
* (e2e) every preset trains two steps of the tiny model on its sample, in one subprocess each,
  and the log shows the rows kept.

The tiny model's tokenizer is char-level: a real row is 100 to 2,000 tokens, so the runs raise
``model.max_seq_length`` to 2,048 (its rotary positions have no hard limit) and truncate the rest
(:data:`LONG`).
"""

from __future__ import annotations

import json
import lzma
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from post_training.data_preference.pairs import load_preference_pairs
from post_training.data_sft import inspect as data_inspect
from post_training.data_sft.dataset_config import load_train_eval
from post_training.frame import validate
from post_training.utils.config import CONFIGS_DIR, register_resolvers

from .conftest import REPO, assistant, system, user

FIXTURES = Path(__file__).parent / "fixtures" / "data"
LONG = ["model.max_seq_length=2048", "data.truncation=truncate"]


@dataclass(frozen=True)
class Preset:
    """A preset, its Hub source and its sample: ``rows`` raw rows once prepared (a one-row sample
    is written twice where the preset holds eval rows out of train)."""

    name: str
    kind: str  # "sft" | "preference"
    hub: str
    splits: tuple[str, str | None]  # train split, eval split (None: from_train)
    transform: str
    sample: str
    rows: int


PRESETS = [
    Preset(
        "alpaca",
        "sft",
        "tatsu-lab/alpaca",
        ("train", None),
        "alpaca",
        "tatsu_alpaca_first4.jsonl",
        4,
    ),
    Preset(
        "alpaca-cleaned",
        "sft",
        "yahma/alpaca-cleaned",
        ("train", None),
        "alpaca",
        "alpaca_cleaned_records_1_6_8_10_13.json",
        5,
    ),
    Preset(
        "dolly",
        "sft",
        "databricks/databricks-dolly-15k",
        ("train", None),
        "alpaca",
        "dolly_15k_first4.jsonl",
        4,
    ),
    Preset(
        "ultrachat-200k",
        "sft",
        "HuggingFaceH4/ultrachat_200k",
        ("train_sft", "test_sft"),
        "messages",
        "ultrachat_200k_train_sft_row0_first4.jsonl",
        1,
    ),
    Preset(
        "slimorca",
        "sft",
        "Open-Orca/SlimOrca",
        ("train", None),
        "sharegpt",
        "slimorca_dedup_torchtune_row.jsonl",
        2,
    ),
    Preset(
        "sharegpt",
        "sft",
        "anon8231489123/ShareGPT_Vicuna_unfiltered",
        ("train", None),
        "sharegpt",
        "sharegpt_axolotl_conversation_first4.jsonl",
        2,
    ),
    Preset(
        "tulu-3-sft-mixture",
        "sft",
        "allenai/tulu-3-sft-mixture",
        ("train", None),
        "messages",
        "tulu_3_sft_mixture_oasst1_5551_cut.jsonl",
        2,
    ),
    Preset(
        "openhermes-2.5",
        "sft",
        "teknium/OpenHermes-2.5",
        ("train", None),
        "sharegpt",
        "openhermes_2_5_card_example.jsonl",
        2,
    ),
    Preset(
        "ultrafeedback-binarized",
        "preference",
        "HuggingFaceH4/ultrafeedback_binarized",
        ("train_prefs", "test_prefs"),
        "preference",
        "ultrafeedback_binarized_train_prefs_row0.json",
        1,
    ),
    Preset(
        "hh-rlhf",
        "preference",
        "Anthropic/hh-rlhf",
        ("train", "test"),
        "hh_rlhf",
        "hh_rlhf_harmless_base_test_first300.jsonl.xz",
        8,
    ),
    Preset(
        "orca-dpo-pairs",
        "preference",
        "Intel/orca_dpo_pairs",
        ("train[500:]", "train[:500]"),
        "orca_pairs",
        "orca_dpo_pairs_first2.jsonl",
        2,
    ),
    Preset(
        "tulu-3-preference-mixture",
        "preference",
        "allenai/llama-3.1-tulu-3-8b-preference-mixture",
        ("train[1000:]", "train[:1000]"),
        "preference",
        "tulu_3_preference_mixture_SHAPED.jsonl",
        2,
    ),
]
BY_NAME = {p.name: p for p in PRESETS}
HH_ROWS = 8  # the first lines of the HH-RLHF sample (line 87 has an empty reply, a real defect)


def prepared_sample(preset: Preset, directory: Path) -> Path:
    """The sample as a file the preset can load: JSON lines where the fixture is one JSON object
    or compressed; a one-row sample written twice when eval rows come out of train."""
    source = FIXTURES / preset.sample
    if preset.sample.endswith(".xz"):
        lines = lzma.decompress(source.read_bytes()).decode().splitlines(keepends=True)
        rows = [json.loads(line) for line in lines[:HH_ROWS]]
    elif preset.sample.endswith(".json"):
        loaded = json.loads(source.read_text())
        if isinstance(loaded, list):
            return source
        rows = [loaded]
    else:
        rows = [json.loads(line) for line in source.read_text().splitlines()]
    if len(rows) == 1 and preset.splits[1] is None:
        rows = rows * 2  # from_train needs two rows to hold one out
    path = directory / f"{preset.name}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def sample_overrides(preset: Preset, path: Path) -> list[str]:
    """``dataset=<name>`` with its train (and eval) split read from ``path``."""
    out = [f"dataset={preset.name}", f"dataset.train.path=jsonl:{path}"]
    if path.suffix == ".json":
        out[1] = f"dataset.train.path=json:{path}"
    if preset.splits[1] is None:
        out.append("dataset.eval.from_train.size=1")
    else:
        out.append(out[1].replace("dataset.train.", "dataset.eval."))
    return out


def composed(config_name: str, overrides: Sequence[str]) -> Any:
    register_resolvers()
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        return compose(config_name, overrides=list(overrides))


def entry_config(preset: Preset) -> str:
    return "train-sft" if preset.kind == "sft" else "train-preference"


# --- Composition and validation ---------------------------------------------------------------


def test_every_preset_file_is_tested() -> None:
    files = {p.stem for p in (CONFIGS_DIR / "dataset").glob("*.yaml")}
    project = {
        "tiny-tasks",
        "tiny-mixture",
        "tiny-pairs",
        "tiny-pairs-mixture",
        "alignment-prepared",
    }
    assert files - project == set(BY_NAME)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_composes_and_validates(preset: Preset) -> None:
    cfg = composed(entry_config(preset), [f"dataset={preset.name}"])
    typed = validate(cfg)
    dataset = typed.dataset
    assert dataset.name == preset.name
    assert dataset.train["path"] == f"hf:{preset.hub}"
    assert dataset.train["split"] == preset.splits[0]
    assert dataset.train["transform"] == preset.transform
    if preset.splits[1] is None:
        assert dataset.eval is not None and set(dataset.eval["from_train"]) >= {"size", "seed"}
    else:
        assert dataset.eval["path"] == f"hf:{preset.hub}"
        assert dataset.eval["split"] == preset.splits[1]
    if preset.kind == "sft":
        # free-form replies: the end-of-run exact match is off unless asked for
        assert dataset.exact_match is False and typed.evaluation.at_end is False
        forced = validate(
            composed("train-sft", [f"dataset={preset.name}", "evaluation.at_end=true"])
        )
        assert forced.evaluation.at_end is True
    else:
        # train_preference scores evaluation.dataset (tiny-tasks, short answers), not the pairs
        assert typed.evaluation.dataset.name == "tiny-tasks" and typed.evaluation.at_end is True


def test_exact_match_default_follows_the_scored_dataset() -> None:
    assert validate(composed("train-sft", [])).evaluation.at_end is True  # tiny-tasks
    sft_eval = ["dataset@evaluation.dataset=ultrachat-200k"]
    assert validate(composed("train-preference", sft_eval)).evaluation.at_end is False


# --- Loading the samples (in process) ---------------------------------------------------------


def _sample_rows(preset: Preset) -> list[dict[str, Any]]:
    text = (FIXTURES / preset.sample).read_text()
    loaded = json.loads(text) if preset.sample.endswith(".json") else None
    if isinstance(loaded, list):
        return loaded
    return [loaded] if loaded is not None else [json.loads(x) for x in text.splitlines()]


def _starts(messages: list[dict[str, str]], roles: list[str], prefixes: list[str]) -> bool:
    return [m["role"] for m in messages] == roles and all(
        m["content"].startswith(p) for m, p in zip(messages, prefixes, strict=True)
    )


SFT_EXPECTED = {
    # preset: (roles, content prefixes) of a conversation the sample must give
    "alpaca": (["user", "assistant"], ["Give three tips for staying healthy.", "1.Eat a balanced"]),
    "alpaca-cleaned": (
        ["user", "assistant"],
        ["Explain why the following fraction is equivalent to 1/4\n\n4/16", "The fraction 4/16"],
    ),
    "dolly": (
        ["user", "assistant"],
        ["When did Virgin Australia start operating?\n\nVirgin Australia, the trading", "Virgin"],
    ),
    "ultrachat-200k": (
        ["user", "assistant", "user", "assistant"],
        ["These instructions apply", "This feature only", "Can you guide", "Sure, here are"],
    ),
    "slimorca": (
        ["system", "user", "assistant"],
        ["You are an AI assistant. You will be given a task.", "Predecesorul", "This text is"],
    ),
    "sharegpt": (
        ["user", "assistant", "user", "assistant"],
        ["how could i implement a minesweeper", "It's possible", "could you give", "Sure."],
    ),
    "tulu-3-sft-mixture": (
        ["user", "assistant"],
        ["explain WebUSB in simple terms", "WebUSB is a technology"],
    ),
    "openhermes-2.5": (
        ["system", "user", "assistant"],
        ["", "Every day, a tree drops 7 leaves.", "Here's the logic behind this:\n\n1."],
    ),
}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.kind == "sft"], ids=lambda p: p.name)
def test_sft_preset_loads_its_sample(preset: Preset, tmp_path: Path) -> None:
    path = prepared_sample(preset, tmp_path)
    config = OmegaConf.to_container(
        composed("train-sft", sample_overrides(preset, path)), resolve=True
    )
    train, eval_ds, report = load_train_eval(config["dataset"])
    n_eval = 1 if preset.splits[1] is None else preset.rows
    n_train = preset.rows - 1 if preset.splits[1] is None else preset.rows
    assert (len(train), len(eval_ds)) == (n_train, n_eval)
    assert report["train"]["rows"] == n_train
    conversations = [r["messages"] for r in (*train, *eval_ds)]
    roles, prefixes = SFT_EXPECTED[preset.name]
    assert any(_starts(m, roles, prefixes) for m in conversations), conversations[0]
    if preset.name == "dolly":  # the category column is kept (stratified hold-out, task_field)
        assert sorted([*train["category"], *eval_ds["category"]]) == sorted(
            r["category"] for r in _sample_rows(preset)
        )
        fish = next(m for m in conversations if m[0]["content"].startswith("Which is"))
        assert fish == [user("Which is a species of fish? Tope or Rope"), assistant("Tope")]


PREFERENCE_EXPECTED = {
    # preset: (prompt, chosen prefix, rejected prefix) of the sample's first pair
    "ultrafeedback-binarized": (
        [user("how can i develop a habit of drawing daily")],
        "Developing a daily habit of drawing",
        "As an AI language model",
    ),
    "tulu-3-preference-mixture": (
        [user("Name the largest planet of the Solar System.")],
        "Jupiter is",
        "Saturn.",
    ),
}


@pytest.mark.parametrize(
    "preset", [p for p in PRESETS if p.kind == "preference"], ids=lambda p: p.name
)
def test_preference_preset_loads_its_sample(preset: Preset, tmp_path: Path) -> None:
    path = prepared_sample(preset, tmp_path)
    config = OmegaConf.to_container(
        composed("train-preference", sample_overrides(preset, path)), resolve=True
    )
    for split in ("train", "eval"):
        pairs = load_preference_pairs(config["dataset"][split], f"dataset.{split}").pairs
        assert len(pairs) == preset.rows
    first, rows = pairs[0], _sample_rows(preset) if preset.name != "hh-rlhf" else []
    if preset.name == "hh-rlhf":  # the prompt: every turn before the last "Assistant:"
        line = lzma.decompress((FIXTURES / preset.sample).read_bytes()).decode().splitlines()[0]
        transcript = json.loads(line)["chosen"]
        head, _, reply = transcript.rpartition("\n\nAssistant:")
        assert head.startswith("\n\nHuman: " + first["prompt"][0]["content"])
        assert [m["role"] for m in first["prompt"]][-1] == "user"
        assert first["chosen"] == [assistant(reply.strip())]
        assert len(first["rejected"]) == 1 and first["rejected"][0]["role"] == "assistant"
        return
    if preset.name == "orca-dpo-pairs":  # system (when non-empty) + question / the answers
        for pair, raw in zip(pairs, rows, strict=True):
            head = [system(raw["system"])] if raw["system"].strip() else []
            assert pair["prompt"] == [*head, user(raw["question"])]
            assert pair["chosen"] == [assistant(raw["chosen"])]
            assert pair["rejected"] == [assistant(raw["rejected"])]
        assert rows[0]["system"] == "" and len(pairs[0]["prompt"]) == 1
        assert pairs[1]["prompt"][0]["role"] == "system"
        return
    prompt, chosen, rejected = PREFERENCE_EXPECTED[preset.name]
    assert first["prompt"] == prompt
    assert len(first["chosen"]) == len(first["rejected"]) == 1
    assert first["chosen"][0]["role"] == first["rejected"][0]["role"] == "assistant"
    assert first["chosen"][0]["content"].startswith(chosen)
    assert first["rejected"][0]["content"].startswith(rejected)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_data_inspect_shows_the_sample(
    preset: Preset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data_inspect`` (its run, in process) on the preset pointed at its sample: each stage of
    the first rows, the trained tokens marked, nothing dropped."""
    overrides = [*sample_overrides(preset, prepared_sample(preset, tmp_path))]
    overrides += [*LONG, "num_samples=2", f"artifacts_dir={tmp_path}"]
    out = data_inspect.run(composed("data-inspect", overrides))
    assert out == capsys.readouterr().out.strip("\n")
    shown = min(2, preset.rows - (1 if preset.splits[1] is None else 0))
    if preset.kind == "sft":
        headers = re.findall(r"^=== train row \d+ \(source (.+)\) ===$", out, re.M)
        assert len(headers) == shown and len(set(headers)) == 1
        for stage in ("--- raw ---", "--- messages ---", "--- templated text ---", "--- tokens"):
            assert out.count(stage) == shown, stage
    else:
        assert len(re.findall(r"^=== train pair \d+ \(.+:\d+\) ===$", out, re.M)) == shown
        for stage in ("--- raw ---", "--- prompt ---", "--- chosen tokens", "--- rejected tokens"):
            assert out.count(stage) == shown, stage
    assert "--- dropped" not in out
    assert out.count("[[") >= shown  # each shown row has trained (completion) tokens


# --- Training a few steps (e2e: one subprocess per entrypoint) -------------------------------

QUICK = [
    "model=tiny",
    "wandb.mode=disabled",
    "tensorboard=false",
    "training_args.num_train_epochs=null",
    "training_args.max_steps=2",
    "training_args.per_device_train_batch_size=1",
    "training_args.gradient_accumulation_steps=1",
    "training_args.logging_steps=1",
    "training_args.save_steps=100",
    "training_args.eval_strategy=no",  # the eval split is still loaded and tokenized (logged)
    "model.max_seq_length=1024",  # enough for every sample's first reply; attention is quadratic
    "data.truncation=truncate",
]

DRIVER = """
import importlib, json, sys, traceback
from hydra.core.global_hydra import GlobalHydra

module, runs = sys.argv[1], json.loads(sys.argv[2])
main = importlib.import_module("post_training." + module).main
codes = {}
for name, overrides in runs.items():
    sys.argv = [module, *overrides]
    GlobalHydra.instance().clear()
    try:
        main()
        codes[name] = 0
    except SystemExit as stop:
        codes[name] = stop.code if isinstance(stop.code, int) else 1
    except Exception:
        traceback.print_exc()
        codes[name] = 1
print("EXIT CODES " + json.dumps(codes), flush=True)
"""
"""Runs an entrypoint's ``main`` (its Hydra app) once per preset in one process: the imports
(~12 s) are paid once per entrypoint instead of once per preset; each run composes, validates,
trains and saves as ``python -m post_training.<module>`` does, into its own job dir."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every preset trained two steps on its sample: the SFT presets in one ``train_sft`` process,
    the preference presets in one ``train_preference`` process. Per preset: exit code, log."""
    root = tmp_path_factory.mktemp("presets")
    artifacts = root / "artifacts"
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts)}
    out: dict[str, Any] = {}
    for kind, module in (("sft", "train_sft"), ("preference", "train_preference")):
        runs = {}
        for p in (p for p in PRESETS if p.kind == kind):
            runs[p.name] = [
                *QUICK,
                f"job_subdir={p.name}",
                *sample_overrides(p, prepared_sample(p, root)),
            ]
            if kind == "preference":  # its exact match is on tiny-tasks: not what is tested here
                runs[p.name].append("evaluation.at_end=false")
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, module, json.dumps(runs)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        found = re.search(r"^EXIT CODES (.+)$", proc.stdout, re.M)
        codes = json.loads(found.group(1)) if found else {}
        for name in runs:
            logs = sorted(
                (artifacts / "private" / "outputs" / module / name).rglob(f"{module}.log")
            )
            out[name] = {
                "code": codes.get(name),
                "log": logs[-1].read_text() if logs else "",
                "proc": proc,
                "job": artifacts / "private" / "outputs" / module / name,
            }
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_trains_on_its_sample(preset: Preset, trained: dict[str, Any]) -> None:
    """Two steps of the tiny model; the log shows every sample row kept. The SFT presets leave
    ``evaluation.at_end`` at its default (off for them), so no exact match runs."""
    run = trained[preset.name]
    proc = run["proc"]
    assert run["code"] == 0, f"{preset.name}: exit {run['code']}\n{proc.stderr[-6000:]}"
    log = run["log"]
    if preset.kind == "sft":
        n_eval = 1 if preset.splits[1] is None else preset.rows
        n_train = preset.rows - n_eval if preset.splits[1] is None else preset.rows
        assert f"train split: kept {n_train} of {n_train} examples" in log, log[-3000:]
        assert f"eval split: kept {n_eval} of {n_eval} examples" in log
        assert "Exact-match accuracy" not in proc.stdout  # no SFT preset runs it by default
    else:
        assert f"train pairs: {preset.rows} of {preset.rows} kept" in log, log[-3000:]
        assert f"eval pairs: {preset.rows} of {preset.rows} kept" in log
    assert "Training 2 steps from step 0" in log
    assert any(run["job"].rglob("final-model/config.json"))
