"""Mixtures (counts, weights, upsampling, determinism), splits, dataset configs, entrypoints."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset
from omegaconf import OmegaConf

from post_training.data_sft.dataset_config import load_train_eval
from post_training.data_sft.mixing import load_dataset_split, plan_counts
from post_training.data_sft.sources import load_source
from post_training.data_sft.splitting import split_dataset, stratified_allocation
from post_training.errors import ConfigError, DataError
from post_training.utils.config import CONFIGS_DIR, register_resolvers
from tests.conftest import run_entrypoint

register_resolvers()


def write_source(path: Path, prefix: str, n: int) -> str:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{prefix} q{i}"},
                {"role": "assistant", "content": f"{prefix} a{i}"},
            ],
            "id": f"{prefix}{i}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    return {
        "a": write_source(tmp_path / "a.jsonl", "a", 100),
        "b": write_source(tmp_path / "b.jsonl", "b", 50),
        "c": write_source(tmp_path / "c.jsonl", "c", 20),
    }


def mix(paths: dict[str, str], amounts: dict[str, dict], **top) -> tuple[Dataset, dict]:
    sources = [
        {"name": k, "path": paths[k], "keep_columns": ["id"], **amount}
        for k, amount in amounts.items()
    ]
    return load_dataset_split({"sources": sources, "seed": 7, **top})


def ids_of(ds: Dataset, source: str) -> list[str]:
    return [i for i, s in zip(ds["id"], ds["source"], strict=True) if s == source]


def selected(report: dict) -> dict[str, int]:
    return {name: info["selected"] for name, info in report.items()}


def test_count_fraction_and_all_rows(paths: dict[str, str]) -> None:
    ds, report = mix(paths, {"a": {"count": 30}, "b": {"fraction": 0.25}, "c": {}})
    assert selected(report) == {"a": 30, "b": 13, "c": 20}  # 12.5 rounds half up
    assert {name: info["available"] for name, info in report.items()} == {
        "a": 100,
        "b": 50,
        "c": 20,
    }
    assert Counter(ds["source"]) == {"a": 30, "b": 13, "c": 20}
    assert ds.column_names == ["messages", "source", "id"]
    # Without replacement: no row twice; every id belongs to the source it is labelled with.
    assert len(set(ds["id"])) == len(ds)
    assert all(i.startswith(s) for i, s in zip(ds["id"], ds["source"], strict=True))


def test_weights_share_total_exactly_and_are_normalised(paths: dict[str, str]) -> None:
    _, report = mix(paths, {"a": {"weight": 3}, "b": {"weight": 1}}, total=80)
    assert selected(report) == {"a": 60, "b": 20}
    _, scaled = mix(paths, {"a": {"weight": 0.3}, "b": {"weight": 0.1}}, total=80)
    assert selected(scaled) == selected(report)
    _, thirds = mix(paths, {"a": {"weight": 1}, "b": {"weight": 1}, "c": {"weight": 1}}, total=50)
    assert selected(thirds) == {"a": 17, "b": 17, "c": 16}
    # Sources with a count take theirs first; the weighted ones share the rest.
    _, fixed = mix(paths, {"a": {"weight": 1}, "b": {"weight": 1}, "c": {"count": 10}}, total=70)
    assert selected(fixed) == {"a": 30, "b": 30, "c": 10}


def test_weights_without_total_take_the_most_that_fits(paths: dict[str, str]) -> None:
    _, even = mix(paths, {"a": {"weight": 1}, "b": {"weight": 1}})
    assert selected(even) == {"a": 50, "b": 50}
    _, skewed = mix(paths, {"a": {"weight": 3}, "b": {"weight": 1}})
    assert selected(skewed) == {"a": 100, "b": 33}  # total 133: 99.75 -> 100, 33.25 -> 33


def test_oversized_request_needs_upsample(paths: dict[str, str]) -> None:
    with pytest.raises(DataError, match="'b': 120 rows requested \\(count 120\\) but it has 50"):
        mix(paths, {"b": {"count": 120}})
    with pytest.raises(DataError, match="upsample: true"):
        mix(paths, {"a": {"weight": 1}, "b": {"weight": 1}}, total=150)
    ds, report = mix(paths, {"b": {"count": 120}}, upsample=True)
    assert selected(report) == {"b": 120}
    copies = Counter(ds["id"])
    assert set(copies) == {f"b{i}" for i in range(50)}
    assert sorted(Counter(copies.values()).items()) == [(2, 30), (3, 20)]  # 2 copies + 20 drawn


def test_mixture_is_deterministic_per_seed_and_per_source(paths: dict[str, str]) -> None:
    amounts = {"a": {"count": 40}, "b": {"count": 20}}
    first, _ = mix(paths, amounts)
    again, _ = mix(paths, amounts)
    assert first.to_list() == again.to_list()
    other, _ = load_dataset_split(
        {
            "sources": [
                {"name": k, "path": paths[k], "keep_columns": ["id"], **v}
                for k, v in amounts.items()
            ],
            "seed": 8,
        }
    )
    assert other["messages"] != first["messages"]
    assert sorted(ids_of(other, "a")) != sorted(ids_of(first, "a"))
    # Each source draws from its own stream (seed, name): adding a source first leaves the
    # others' rows unchanged.
    more, _ = mix(paths, {"c": {"count": 5}, **amounts})
    for name in ("a", "b"):
        assert sorted(ids_of(more, name)) == sorted(ids_of(first, name))


def test_mixture_is_shuffled_and_single_source_keeps_file_order(paths: dict[str, str]) -> None:
    ds, _ = mix(paths, {"a": {}, "b": {}})
    assert ds["source"] != ["a"] * 100 + ["b"] * 50
    single, report = load_dataset_split({"path": paths["c"], "keep_columns": ["id"]})
    assert single["id"] == [f"c{i}" for i in range(20)]
    name = f"{Path(paths['c']).parent.name}/c"  # derived from the path: <parent>/<stem>
    assert single["source"] == [name] * 20 and list(report) == [name]
    sub, _ = load_dataset_split({"path": paths["a"], "fraction": 0.1, "keep_columns": ["id"]})
    assert sorted(sub["id"], key=lambda i: int(i[1:])) == sub["id"] and len(sub) == 10


def test_kept_columns_are_united_and_source_can_be_kept(tmp_path: Path, paths) -> None:
    extra = tmp_path / "extra.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    extra.write_text(json.dumps({**row, "task": "t", "source": "upstream"}) + "\n")
    ds, _ = load_dataset_split(
        {
            "sources": [
                {"name": "a", "path": paths["c"], "keep_columns": ["id"]},
                {"name": "x", "path": str(extra), "keep_columns": ["task", "source"]},
            ]
        }
    )
    rows = {r["source"]: r for r in ds}
    assert rows["upstream"]["task"] == "t" and rows["upstream"]["id"] is None
    assert rows["a"]["task"] is None


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"sources": [{"path": "a", "weigth": 1}]}, "unknown keys \\['weigth'\\]"),
        ({"sources": [{"path": "a", "count": 1, "weight": 1}]}, "at most one of"),
        ({"sources": [{"path": "a"}], "total": 10}, "no source has a weight"),
        ({"sources": [{"path": "a"}, {"path": "a"}]}, "several sources are named"),
        ({"sources": [{"path": "a"}], "seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_mixture_specs(paths: dict[str, str], spec: dict, message: str) -> None:
    for src in spec["sources"]:
        src["path"] = paths["a"]
    with pytest.raises(ConfigError, match=message):
        load_dataset_split(spec)


def test_plan_counts_fraction_rounding_and_total_too_small() -> None:
    assert plan_counts([{"fraction": 0.5}, {"fraction": 0.1}], [5, 25]) == [3, 3]
    with pytest.raises(ConfigError, match="smaller than the 30 rows"):
        plan_counts([{"count": 30}, {"weight": 1}], [50, 50], total=20)


# --- Splits -----------------------------------------------------------------------------------


def stratified_rows(sizes: dict[str, int]) -> Dataset:
    return Dataset.from_list([{"i": i, "g": g} for g, n in sizes.items() for i in range(n)])


def test_split_sizes_are_exact_disjoint_and_keep_order() -> None:
    ds = stratified_rows({"x": 100})
    train, evals = split_dataset(ds, size=13, seed=1)
    assert (len(train), len(evals)) == (87, 13)
    assert sorted([*train["i"], *evals["i"]]) == list(range(100))
    assert train["i"] == sorted(train["i"]) and evals["i"] == sorted(evals["i"])
    assert len(split_dataset(ds, fraction=0.125, seed=1)[1]) == 13  # 12.5 rounds half up
    with pytest.raises(ConfigError, match="exactly one"):
        split_dataset(ds, size=3, fraction=0.1)
    with pytest.raises(ConfigError, match="eval size must be an integer in \\[1, 99\\]"):
        split_dataset(ds, size=100)


def test_stratified_split_is_proportional_and_deterministic() -> None:
    ds = stratified_rows({"a": 60, "b": 30, "c": 10})
    train, evals = split_dataset(ds, size=10, stratify_by="g", seed=3)
    assert Counter(evals["g"]) == {"a": 6, "b": 3, "c": 1}
    assert Counter(train["g"]) == {"a": 54, "b": 27, "c": 9}
    again = split_dataset(ds, size=10, stratify_by="g", seed=3)[1]
    assert again.to_list() == evals.to_list()
    assert split_dataset(ds, size=10, stratify_by="g", seed=4)[1]["i"] != evals["i"]
    with pytest.raises(ConfigError, match="stratify_by 'task' is not a column"):
        split_dataset(ds, size=10, stratify_by="task")


def test_every_stratum_gets_an_eval_row_when_possible() -> None:
    assert stratified_allocation([96, 2, 2], 5) == [3, 1, 1]  # proportional would be 5, 0, 0
    assert stratified_allocation([50, 30, 20], 10) == [5, 3, 2]
    assert stratified_allocation([3, 9], 10) == [2, 8]  # rounding gave [3, 7]: no train row left
    assert stratified_allocation([5, 5, 5], 2) == [1, 1, 0]  # too small for one row per stratum


# --- Dataset configs --------------------------------------------------------------------------


def test_tiny_mixture_config_builds_train_and_stratified_eval() -> None:
    cfg = OmegaConf.create(
        {"seed": 42, "dataset": OmegaConf.load(CONFIGS_DIR / "dataset/tiny-mixture.yaml")}
    )
    train, evals, report = load_train_eval(cfg.dataset)
    assert (len(train), len(evals)) == (3800, 200)
    assert report["train"]["sources"]["tiny-tasks"]["selected"] == 4000
    assert report["eval"]["from_train"]["stratify_by"] == "task"
    tasks = Counter(evals["task"])
    assert sum(tasks.values()) == 200 and set(tasks) == {"add", "count", "reverse", "sort"}
    assert not {json.dumps(m) for m in evals["messages"]} & {
        json.dumps(m) for m in train["messages"]
    }
    again = load_train_eval(cfg.dataset)[1]
    assert again.to_list() == evals.to_list()


def test_dataset_config_with_eval_source_limits_and_old_schema(tmp_path: Path, paths) -> None:
    cfg = {
        "train": {"path": paths["a"], "keep_columns": ["id"]},
        "eval": {"path": paths["b"]},
        "max_train_examples": 10,
    }
    train, evals, report = load_train_eval(cfg)
    assert train["id"] == [f"a{i}" for i in range(10)] and len(evals) == 50
    assert report["eval"]["rows"] == 50
    assert load_train_eval({**cfg, "eval": None})[1] is None
    old = {"train_path": paths["c"], "eval_path": paths["b"], "messages_field": "messages"}
    train, evals, _ = load_train_eval({**old, "task_field": "id"})
    assert (len(train), len(evals)) == (20, 50) and train[0]["id"] == "c0"


# --- Entrypoints ------------------------------------------------------------------------------


def test_build_mixture_entrypoint_saves_refuses_and_overwrites(
    artifacts: Path, paths: dict[str, str]
) -> None:
    sources = f"[{{name:a,path:'{paths['a']}',weight:3}},{{name:b,path:'{paths['b']}',weight:1}}]"
    args = ["name=mymix", f"mixture.sources={sources}", "mixture.total=40"]
    split = "eval_split={size:8,stratify_by:source}"
    proc = run_entrypoint("data_sft.build_mixture", [*args, split], artifacts)
    out = artifacts / "private" / "datasets" / "mymix"
    assert re.search(r"^a\s+30\s+100$", proc.stdout, re.MULTILINE)
    assert re.search(r"^b\s+10\s+50$", proc.stdout, re.MULTILINE)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 32, "eval": 8}
    assert {k: v["selected"] for k, v in manifest["sources"].items()} == {"a": 30, "b": 10}
    assert manifest["sources"]["a"]["fingerprint"] and manifest["config_hash"]
    assert manifest["seed"] == 42 and manifest["strata"] == {
        "a": {"train": 24, "eval": 6},
        "b": {"train": 8, "eval": 2},
    }
    evals = load_source({"path": f"local:{out}", "split": "eval"})
    assert Counter(evals["source"]) == {"a": 6, "b": 2}
    # Existing output: refused, nothing touched.
    before = (out / "manifest.json").read_text()
    # The old entrypoint path is an alias of the same main.
    refused = run_entrypoint("data_sft.dataset_mixture", args, artifacts, check=False)
    assert refused.returncode != 0
    assert "already exists; refusing to overwrite" in refused.stderr
    assert (out / "manifest.json").read_text() == before
    run_entrypoint("data_sft.build_mixture", [*args, "overwrite=true"], artifacts)
    assert json.loads((out / "manifest.json").read_text())["splits"] == {"train": 40}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_build_split_entrypoint(artifacts: Path, tmp_path: Path) -> None:
    args = ["name=tt", "eval_fraction=null", "eval_size=40", "stratify_by=task"]
    proc = run_entrypoint("data_sft.build_split", args, artifacts)
    out = artifacts / "private" / "datasets" / "tt"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 7960, "eval": 40}
    assert {v["eval"] for v in manifest["strata"].values()} == {10}  # tasks are balanced
    assert re.search(r"^add\s+1990\s+10$", proc.stdout, re.MULTILINE)
    assert "Saved 'tt' (train 7960, eval 40 rows)" in proc.stdout
    train = load_source({"path": f"local:{out}"})
    assert train.column_names == ["messages", "source", "answer", "task"]
    refused = run_entrypoint("data_sft.dataset_split", args, artifacts, check=False)  # old path
    assert refused.returncode != 0 and "already exists" in refused.stderr
