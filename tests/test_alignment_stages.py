"""Each alignment data stage on tiny data, against independent computations: filtering, seeded
sampling (partition- and batch-independent, greedy = HF generate), reference log-probs (= a plain
forward), rewards (registry and a real sequence-classification model), training pairs with
quantile rewards, mixing, and partition -> merge = unpartitioned."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

import post_training
from post_training.data_alignment.generation import SamplingOptions, SeededSampler
from post_training.data_alignment.merge_partitions import merge
from post_training.data_alignment.partitions import read_stage
from post_training.data_alignment.rewards import (
    REWARD_FUNCTIONS,
    register_reward,
    resolve_reward_function,
)
from post_training.data_alignment.stage import open_stage, stage_output
from post_training.errors import ConfigError, DataError
from post_training.modeling.loading import load_model
from post_training.utils.config import asset_path

from .conftest import run_entrypoint

CONFIGS = Path(post_training.__file__).parent / "configs"
STAGES = {
    "filter_dataset_for_model": "filter-dataset-for-model",
    "generate_ref_completions": "generate-ref-completions",
    "compute_ref_logprobs": "compute-ref-logprobs",
    "compute_rewards": "compute-rewards",
    "prepare_train_dataset": "prepare-train-dataset",
    "merge_partitions": "merge-partitions",
}


def stage(name: str, artifacts: Path, *overrides: str) -> Path:
    """Run a stage in this process (Hydra compose + run)."""
    import os

    os.environ["POST_TRAINING_ARTIFACTS_DIR"] = str(artifacts)
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose(STAGES[name], overrides=["wandb.mode=disabled", *overrides])
    return importlib.import_module(f"post_training.data_alignment.{name}").run(cfg)


def rows_of(path: Path) -> list[dict[str, Any]]:
    return read_stage(path).rows


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny-llama"))


def _ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Independent of our encoder: the tokenizer's own Jinja template, then its tokenizer."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- filter_dataset_for_model -------------------------------------------------------------------


def test_filter_keeps_what_fits_and_counts_drops(artifacts: Path, tokenizer) -> None:
    out = stage(
        "filter_dataset_for_model",
        artifacts,
        "dataset.max_train_examples=60",
        "filter.max_prompt_length=14",
    )
    rows = rows_of(out)
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert report["rows_in"] == 60 and report["rows_out"] == len(rows)
    assert sum(report["dropped"].values()) == 60 - len(rows) > 0
    assert set(report["dropped"]) == {"prompt_too_long"}
    for row in rows:
        assert len(_ids(tokenizer, row["prompt"], True)) <= 14
        assert row["answer"] and row["task"] and row["id"].startswith("train-")
    kept = {r["id"] for r in rows}
    source = [
        json.loads(x)
        for x in Path(asset_path("tiny-tasks/train.jsonl")).read_text().splitlines()[:60]
    ]
    for i, raw in enumerate(source):  # every long prompt dropped, every short one kept
        prompt_len = len(_ids(tokenizer, raw["messages"][:-1], True))
        assert (f"train-{i}" in kept) == (prompt_len <= 14)

    # Offline pairs: a preference dataset keeps chosen / rejected and their rewards.
    pairs = stage(
        "filter_dataset_for_model", artifacts, "dataset=tiny-pairs", "dataset.max_train_examples=10"
    )
    row = rows_of(pairs)[0]
    assert row["chosen"][0]["role"] == "assistant" and row["chosen_reward"] == 1.0
    assert "rejected_reward" in row


def test_filter_errors_on_a_prompt_without_user_turn(artifacts: Path, tmp_path: Path) -> None:
    data = _jsonl(
        tmp_path / "chats.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "b"},
                ]
            },
        ],
    )
    with pytest.raises(DataError, match="row 'train-1': the prompt has no user turn"):
        stage(
            "filter_dataset_for_model", artifacts, f"dataset.train.path={data}", "dataset.eval=null"
        )


# --- generate_ref_completions -------------------------------------------------------------------


def test_seeded_sampler_draws_by_inverse_cdf() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    u = torch.tensor([[0.45], [0.55], [0.85]])  # cdf 0.5, 0.8, 1.0
    ids = torch.zeros((3, 4), dtype=torch.long)
    pick = lambda opts: SeededSampler(u, 4, opts)(ids, logits.clone()).argmax(-1).tolist()  # noqa: E731
    assert pick(SamplingOptions()) == [0, 1, 2]
    assert pick(SamplingOptions(top_k=2)) == [0, 0, 1]  # renormalised over {0.5, 0.3}: cdf .625
    assert pick(SamplingOptions(top_p=0.5)) == [0, 0, 0]  # only the first token's mass is needed
    assert pick(SamplingOptions(top_p=0.8)) == [0, 0, 1]  # 0.5 + 0.3 reaches 0.8
    assert pick(SamplingOptions(temperature=0)) == [0, 0, 0]
    out = SeededSampler(u, 4, SamplingOptions())(ids, logits.clone())
    assert torch.isinf(out).sum() == 6 and (out == 0).sum() == 3  # one allowed token per row


def test_generation_is_reproducible_per_prompt(artifacts: Path) -> None:
    stage("filter_dataset_for_model", artifacts, "dataset.max_train_examples=12")
    common = ["dataset.max_train_examples=12", "generation.num_completions=3"]
    whole = stage("generate_ref_completions", artifacts, *common, "generation.batch_size=5")
    parts = [
        stage(
            "generate_ref_completions",
            artifacts,
            *common,
            "generation.batch_size=2",
            f"partition.index={i}",
            "partition.count=3",
            "output_dir=${alignment.dir}/gen-3",
        )
        for i in range(3)
    ]
    merged = merge(parts[0].parent)
    expected = rows_of(whole)
    assert rows_of(merged) == expected  # same completions whatever the partitions and batches
    assert all(len(r["ref_completions"]) == 3 for r in expected)
    assert len({c for r in expected for c in r["ref_completions"]}) > 12  # sampled, not greedy
    # Re-running a finished partition skips it (the file is untouched).
    mtime = (parts[1] / "rows.jsonl").stat().st_mtime_ns
    stage(
        "generate_ref_completions",
        artifacts,
        *common,
        "generation.batch_size=2",
        "partition.index=1",
        "partition.count=3",
        "output_dir=${alignment.dir}/gen-3",
    )
    assert (parts[1] / "rows.jsonl").stat().st_mtime_ns == mtime
    # Another seed into the same partitions is refused (never mixed), unless overwrite.
    with pytest.raises(ConfigError, match=r"differing configs|overwrite=true"):
        stage(
            "generate_ref_completions",
            artifacts,
            *common,
            "generation.seed=7",
            "partition.index=1",
            "partition.count=3",
            "output_dir=${alignment.dir}/gen-3",
        )


def test_greedy_generation_equals_hf_generate(artifacts: Path, tokenizer) -> None:
    stage("filter_dataset_for_model", artifacts, "dataset.max_train_examples=6")
    common = ["dataset.max_train_examples=6", "generation.num_completions=2"]
    rows = rows_of(
        stage("generate_ref_completions", artifacts, *common, "generation.temperature=0")
    )
    model = load_model(_tiny_cfg(), tokenizer).eval()
    for row in rows:
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        out = model.generate(
            ids, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert row["ref_completions"] == [text, text]


def test_vllm_backend_needs_a_gpu(artifacts: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the vLLM backend may run")
    stage("filter_dataset_for_model", artifacts, "dataset.max_train_examples=4")
    with pytest.raises(ConfigError, match="needs the vllm package and a CUDA GPU"):
        stage("generate_ref_completions", artifacts, "generation.backend=vllm")


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="the vLLM backend needs a CUDA GPU and the vllm package",
)
def test_vllm_generation(artifacts: Path, tmp_path: Path, tokenizer) -> None:
    model_dir = tmp_path / "tiny"
    load_model(_tiny_cfg(), tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    saved = [f"model.model_name_or_path={model_dir}", "model.init_from_config=false"]
    stage("filter_dataset_for_model", artifacts, "dataset.max_train_examples=8", *saved)
    gen = ["dataset.max_train_examples=8", *saved, "generation.backend=vllm"]
    out = stage("generate_ref_completions", artifacts, *gen, "generation.temperature=0")
    greedy = rows_of(out)
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert report["backend"] == "vllm" and len(greedy) == 8
    hf = stage(
        "generate_ref_completions",
        artifacts,
        *gen[:-1],
        "generation.backend=hf",
        "generation.temperature=0",
        "output_dir=${alignment.dir}/hf",
    )
    agree = [
        a["ref_completions"] == b["ref_completions"]
        for a, b in zip(greedy, rows_of(hf), strict=True)
    ]
    assert sum(agree) >= 6  # greedy decoding agrees but for near-ties in another kernel


def _tiny_cfg() -> dict[str, Any]:
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("generate-ref-completions")
    from post_training.utils.config import to_container

    return to_container(cfg)["model"]


# --- compute_ref_logprobs -----------------------------------------------------------------------


@torch.no_grad()
def _plain_logps(model, tokenizer, prompt: list[dict], reply: str) -> float:
    """Independent: the templated text, one forward, log-softmax summed after the prompt."""
    full = _ids(tokenizer, [*prompt, {"role": "assistant", "content": reply}])
    start = len(_ids(tokenizer, prompt, True))
    ids = torch.tensor([full])
    logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return float(logps[torch.arange(len(targets)), targets][start - 1 :].sum())


def test_reference_logps_equal_a_plain_forward(artifacts: Path, tmp_path: Path, tokenizer) -> None:
    common = ["dataset=tiny-pairs", "dataset.max_train_examples=8"]
    stage("filter_dataset_for_model", artifacts, *common)
    stage("generate_ref_completions", artifacts, *common, "generation.num_completions=2")
    out = stage("compute_ref_logprobs", artifacts, *common, "ref_logprobs.batch_size=3")
    model = load_model(_tiny_cfg(), tokenizer).eval()
    for row in rows_of(out):
        for side in ("chosen", "rejected"):
            expected = _plain_logps(model, tokenizer, row["prompt"], row[side][0]["content"])
            assert math.isclose(row[f"ref_{side}_logps"], expected, rel_tol=1e-5, abs_tol=1e-4)
        for text, value in zip(row["ref_completions"], row["ref_completions_logps"], strict=True):
            expected = _plain_logps(model, tokenizer, row["prompt"], text)
            assert math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-4)
    # The dataset's reference answer, when there is one (and an empty completion).
    hand = stage(
        "compute_ref_logprobs",
        artifacts,
        f"input={_rows_file(tmp_path)}",
        "output_dir=${alignment.dir}/hand",
    )
    for row in rows_of(hand):
        expected = _plain_logps(model, tokenizer, row["prompt"], row["answer"])
        assert math.isclose(row["ref_answer_logps"], expected, rel_tol=1e-5, abs_tol=1e-4)
        assert all(v is not None for v in row["ref_completions_logps"])


def test_a_pair_that_does_not_fit_is_left_out_not_left_unscored(
    artifacts: Path, tmp_path: Path
) -> None:
    """Dropped by the length policy (data.truncation=drop): the row leaves the output (a row
    without ref logps would stop train_preference), the rest is scored, the report says so."""
    prompt = [{"role": "user", "content": "add 1+2"}]
    rows = [
        {"id": "fits", "prompt": prompt, "chosen": "3", "rejected": "5"},
        {"id": "long", "prompt": prompt, "chosen": "3" * 2000, "rejected": "5"},
    ]
    rows = [
        {**r, "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in rows
    ]  # fmt: skip
    out = stage(
        "compute_ref_logprobs",
        artifacts,
        f"input={_jsonl(tmp_path / 'pairs.jsonl', rows)}",
        "data.truncation=drop",
    )
    kept = rows_of(out)
    assert [r["id"] for r in kept] == ["fits"] and kept[0]["ref_chosen_logps"] < 0
    report = json.loads((out / "manifest.json").read_text())["report"]["pairs"]
    assert report["scored"] == 1 and report["filter"]["dropped"] == {"too_long": 1}


# --- compute_rewards ----------------------------------------------------------------------------


def test_reward_registry() -> None:
    @register_reward("test_length")
    def length(completion: str, row: dict) -> float:
        return float(len(completion))

    assert resolve_reward_function("test_length") is length
    assert REWARD_FUNCTIONS["exact_match"](" 12 ", {"answer": "12"}) == 1.0
    assert REWARD_FUNCTIONS["exact_match"]("13", {"answer": "12"}) == 0.0
    assert resolve_reward_function("post_training.data_alignment.rewards:exact_match")
    with pytest.raises(ConfigError, match=r"not registered; registered: .*exact_match"):
        resolve_reward_function("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length")(lambda c, r: 0.0)
    del REWARD_FUNCTIONS["test_length"]


def _rows_file(tmp_path: Path) -> Path:
    prompt = [{"role": "user", "content": "add 1+2"}]
    return _jsonl(
        tmp_path / "generated.jsonl",
        [
            {"id": "r0", "prompt": prompt, "answer": "3", "ref_completions": ["3", "4", "33", ""]},
            {
                "id": "r1",
                "prompt": prompt,
                "answer": "3",
                "chosen": [{"role": "assistant", "content": "3"}],
                "rejected": [{"role": "assistant", "content": "5"}],
                "ref_completions": ["5", "3", "3", "2"],
            },
        ],
    )


def test_rewards_from_a_function(artifacts: Path, tmp_path: Path) -> None:
    out = stage("compute_rewards", artifacts, f"input={_rows_file(tmp_path)}")
    r0, r1 = rows_of(out)
    assert r0["ref_rewards"] == [1.0, 0.0, 0.0, 0.0]
    assert r1["ref_rewards"] == [0.0, 1.0, 1.0, 0.0]
    assert (r1["chosen_reward"], r1["rejected_reward"]) == (1.0, 0.0)
    assert r0["answer_reward"] == r1["answer_reward"] == 1.0

    nan = tmp_path / "nanreward.py"
    nan.write_text(
        "from post_training.data_alignment.rewards import register_reward\n"
        "@register_reward('test_nan')\n"
        "def f(completion, row):\n    return float('nan') if completion == '33' else 0.0\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(DataError, match="row 'r0': reward of ref_2 is nan"):
            stage(
                "compute_rewards",
                artifacts,
                f"input={_rows_file(tmp_path)}",
                "reward.function=test_nan",
                "reward.module=nanreward",
                "output_dir=${alignment.dir}/nan",
            )
    finally:
        sys.path.remove(str(tmp_path))
        REWARD_FUNCTIONS.pop("test_nan", None)


def test_missing_completions_are_an_error(artifacts: Path, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in _rows_file(tmp_path).read_text().splitlines()]
    del rows[1]["ref_completions"]
    bad = _jsonl(tmp_path / "uneven.jsonl", rows)
    with pytest.raises(DataError, match=r"missing or uneven .*first row without any: 'r1'"):
        stage("compute_rewards", artifacts, f"input={bad}")


def _reward_model(path: Path, tokenizer, vocab: int) -> Path:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def test_rewards_from_a_sequence_classifier(artifacts: Path, tmp_path: Path, tokenizer) -> None:
    path = _reward_model(tmp_path / "rm", tokenizer, len(tokenizer))
    rm = [
        "reward.function=null",
        f"reward.model.model_name_or_path={path}",
        "reward.model.batch_size=3",
    ]
    out = stage("compute_rewards", artifacts, f"input={_rows_file(tmp_path)}", *rm)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    for row in rows_of(out):
        for text, reward in zip(row["ref_completions"], row["ref_rewards"], strict=True):
            ids = tokenizer.apply_chat_template(
                [*row["prompt"], {"role": "assistant", "content": text}], return_tensors="pt"
            )
            ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
            assert math.isclose(reward, float(model(ids).logits[0, 0]), rel_tol=1e-4, abs_tol=1e-5)

    small = _reward_model(tmp_path / "rm-small", tokenizer, len(tokenizer) - 8)
    with pytest.raises(ConfigError, match="tokenizer does not match the model"):
        stage(
            "compute_rewards",
            artifacts,
            f"input={_rows_file(tmp_path)}",
            "reward.function=null",
            f"reward.model.model_name_or_path={small}",
            "output_dir=${alignment.dir}/small",
        )
    with pytest.raises(ConfigError, match="exactly one of"):
        stage("compute_rewards", artifacts, f"input={_rows_file(tmp_path)}", *rm[1:])


# --- prepare_train_dataset ----------------------------------------------------------------------


def test_prepare_pairs_quantiles_and_mixing(artifacts: Path, tmp_path: Path) -> None:
    rewarded = stage("compute_rewards", artifacts, f"input={_rows_file(tmp_path)}")
    out = stage(
        "prepare_train_dataset",
        artifacts,
        "prepare.pairs=[best_worst,offline]",
        f"prepare.inputs=[{{name: a, path: '{rewarded}'}}]",
        "prepare.shuffle=false",
    )
    rows = {r["id"]: r for r in rows_of(out)}
    report = json.loads((out / "manifest.json").read_text())["report"]["a"]
    assert report["dropped"] == {"offline_missing": 1}
    best = rows["a/r0/best_worst"]  # rewards [1, 0, 0, 0]; the empty completion is never picked
    assert best["chosen"][0]["content"] == "3" and best["rejected"][0]["content"] == "4"
    assert best["chosen_quantile_reward"] == 1.0 and best["rejected_quantile_reward"] == 0.75
    assert best["ref_rewards"] == [1.0, 0.0, 0.0, 0.0] and best["answer"] == "3"
    offline = rows["a/r1/offline"]  # ref rewards [0, 1, 1, 0]
    assert offline["chosen_quantile_reward"] == 1.0 and offline["rejected_quantile_reward"] == 0.5
    assert rows["a/r1/best_worst"]["chosen"][0]["content"] == "3"  # first of the tied best
    answer = rows_of(
        stage(
            "prepare_train_dataset",
            artifacts,
            "prepare.pairs=[answer_worst]",
            f"prepare.inputs=[{{name: a, path: '{rewarded}'}}]",
            "output_dir=${alignment.dir}/aw",
        )
    )
    by_id = {r["id"]: r for r in answer}
    assert by_id["a/r0/answer_worst"]["rejected"][0]["content"] == "4"  # "" is never picked
    assert by_id["a/r1/answer_worst"]["rejected"][0]["content"] == "5"
    assert by_id["a/r1/answer_worst"]["chosen"][0]["content"] == "3"
    assert by_id["a/r1/answer_worst"]["chosen_reward"] == 1.0

    # A margin no pair clears; and a mix of two inputs by count, partitioned then merged.
    with pytest.raises(DataError, match="no pair was built"):
        stage(
            "prepare_train_dataset",
            artifacts,
            "prepare.min_reward_margin=1.0",
            f"prepare.inputs=[{{name: a, path: '{rewarded}'}}]",
            "output_dir=${alignment.dir}/m",
        )
    mix = [
        f"prepare.inputs=[{{name: a, path: '{rewarded}', count: 1}},"
        f"{{name: b, path: '{rewarded}'}}]",
        "prepare.pairs=[best_worst,offline]",
    ]
    whole = rows_of(
        stage("prepare_train_dataset", artifacts, *mix, "output_dir=${alignment.dir}/w")
    )
    assert sorted(r["source"] for r in whole) == ["a", "b", "b", "b"]
    for i in range(2):
        last = stage(
            "prepare_train_dataset",
            artifacts,
            *mix,
            f"partition.index={i}",
            "partition.count=2",
            "output_dir=${alignment.dir}/p",
        )
    assert rows_of(merge(last.parent)) == whole


def test_stage_cli(artifacts: Path) -> None:
    """The Hydra entrypoint as a SLURM array task runs it: ``python -m``."""
    args = [
        "wandb.mode=disabled",
        "dataset.max_train_examples=5",
        "partition.index=1",
        "partition.count=2",
    ]
    run_entrypoint("data_alignment.filter_dataset_for_model", args, artifacts)
    out = artifacts / "private/alignment-data/tiny-tasks/tiny/filter_dataset_for_model"
    assert [r["id"] for r in rows_of(out / "partition-00001-of-00002")] == [
        "train-2",
        "train-3",
        "train-4",
    ]
    proc = run_entrypoint(
        "data_alignment.merge_partitions",
        ["stage=filter_dataset_for_model"],
        artifacts,
        check=False,
    )
    assert proc.returncode != 0 and "partitions [0] of 2 are missing" in proc.stderr


# --- the stage frame (open_stage) ---------------------------------------------------------------


def test_the_stage_frame_writes_on_a_clean_exit_only(tmp_path: Path) -> None:
    config = {"output_dir": str(tmp_path / "out"), "partition": {"index": 0, "count": 1}}
    settings, inputs = {"k": 1}, [{"path": "in.jsonl", "rows": 2}]
    with pytest.raises(DataError, match="boom"), open_stage(config, "s", settings, inputs) as out:
        assert not out.done
        out.rows, out.report = [{"id": "a"}], {}
        raise DataError("boom")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary directory
    with (
        pytest.raises(RuntimeError, match="without setting rows"),
        open_stage(config, "s", settings, inputs),
    ):
        pass
    assert not list(tmp_path.iterdir())

    with open_stage(config, "s", settings, inputs) as out:
        out.rows, out.report = [{"id": "a"}, {"id": "b"}], {"n": 2}
    manifest = json.loads((out.path / "manifest.json").read_text())
    assert manifest["config_hash"] == stage_output(config, "s", settings, inputs).config_hash
    assert (manifest["rows"], manifest["report"]) == (2, {"n": 2})
    assert (manifest["settings"], manifest["inputs"]) == (settings, inputs)
    assert [r["id"] for r in rows_of(out.path)] == ["a", "b"]
    mtime = (out.path / "rows.jsonl").stat().st_mtime_ns
    with open_stage(config, "s", settings, inputs) as again:
        assert again.done and again.path == out.path
    assert (out.path / "rows.jsonl").stat().st_mtime_ns == mtime


def test_a_stage_skips_a_complete_partition_and_writes_from_the_main_process_only(
    artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from post_training.data_alignment import stage as frame

    calls: list[str] = []

    @register_reward("test_counted")
    def counted(completion: str, row: dict) -> float:
        calls.append(completion)
        return float(len(completion))

    args = (
        f"input={_rows_file(tmp_path)}",
        "reward.function=test_counted",
        "output_dir=${alignment.dir}/counted",
    )
    try:
        with monkeypatch.context() as patch:  # process 1 of 2: computes, writes nothing
            rank1 = SimpleNamespace(is_main_process=False, num_processes=2, process_index=1)
            patch.setattr(frame, "stage_accelerator", lambda: rank1)
            path = stage("compute_rewards", artifacts, *args)
        assert len(calls) == 12 and not path.exists()
        assert not path.parent.exists() or not list(path.parent.iterdir())
        calls.clear()
        assert stage("compute_rewards", artifacts, *args) == path  # the main process writes
        assert len(calls) == 12 and (path / "manifest.json").is_file()
        calls.clear()
        mtime = (path / "rows.jsonl").stat().st_mtime_ns
        assert stage("compute_rewards", artifacts, *args) == path  # complete: skipped
        assert not calls and (path / "rows.jsonl").stat().st_mtime_ns == mtime
        # A write cut short (half the rows, no manifest) is redone, to the same bytes.
        written = (path / "rows.jsonl").read_bytes()
        (path / "manifest.json").unlink()
        (path / "rows.jsonl").write_bytes(written[: len(written) // 2])
        assert stage("compute_rewards", artifacts, *args) == path and len(calls) == 12
        assert (path / "rows.jsonl").read_bytes() == written
    finally:
        REWARD_FUNCTIONS.pop("test_counted", None)


@pytest.mark.e2e
def test_two_processes_split_a_partition(artifacts: Path) -> None:
    """``accelerate launch --num_processes 2`` (CPU, gloo): each process takes a contiguous shard
    of the partition; the gathered rows equal a one-process run's."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    stage(
        "filter_dataset_for_model", artifacts, "dataset=tiny-pairs", "dataset.max_train_examples=9"
    )
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts), "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29519", "-m",
    ]  # fmt: skip
    common = ["wandb.mode=disabled", "dataset=tiny-pairs", "dataset.max_train_examples=9"]
    for module in ("generate_ref_completions", "compute_ref_logprobs"):
        two = [*common, "output_dir=${alignment.dir}/" + module + "-two"]
        if module == "compute_ref_logprobs":
            two.append("input=${alignment.dir}/generate_ref_completions-two")
        proc = subprocess.run(
            [*launch, f"post_training.data_alignment.{module}", *two],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-5000:]
        one = rows_of(stage(module, artifacts, *common[1:]))
        two_rows = rows_of(artifacts / f"private/alignment-data/tiny-pairs/tiny/{module}-two")
        assert [r["id"] for r in one] == [r["id"] for r in two_rows]
        for a, b in zip(one, two_rows, strict=True):  # batches differ: float sums to 1e-5
            assert a.keys() == b.keys() and a["ref_completions"] == b["ref_completions"]
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                assert math.isclose(a.get(key, 0), b.get(key, 0), rel_tol=1e-5, abs_tol=1e-5)
