"""Fetch once, then train offline: ``python -m post_training.download`` and the one-line errors
of a model or Hub dataset that is not in the local Hugging Face cache (no network: the "Hub"
is a cache layout built in a temp dir, and an online run talks to a closed local port)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from post_training.data_sft.sources import load_source
from post_training.errors import ConfigError, DataError
from post_training.utils import hub_cache
from post_training.utils.config import ASSETS_DIR
from post_training.utils.hub_cache import ModelNeeds

from .conftest import QUICK, job_dir, run_entrypoint, save_initial_model

MODEL_ID = "post-training-tests/tiny-llama"
DATASET_ID = "post-training-tests/tiny-tasks"
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: a network call fails at once


def hf_env(tmp_path: Path, offline: bool = True) -> dict[str, str]:
    """An empty Hugging Face home of its own; downloads off unless ``offline=False`` (then the
    Hub endpoint is a closed port)."""
    home = tmp_path / "hf"
    env = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
    }
    return env if offline else {**env, "HF_ENDPOINT": CLOSED_PORT}


def cache_repo(cache: Path, repo_id: str, files: Path, repo_type: str = "model") -> Path:
    """``files`` as the Hub client caches a repository: content-named blobs, the snapshot of a
    commit linking to them, ``refs/main`` naming the commit. Returns the snapshot."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def assert_nothing_written(artifacts: Path) -> None:
    """Only what Hydra writes before the job starts (.hydra/, the job log) and the launch's
    status.json: no run config, data cache, metrics or checkpoints."""
    written = [p for p in artifacts.rglob("*") if p.is_file()]
    assert written, "the launch wrote no Hydra dir: the test proves nothing"
    allowed = (
        ".hydra" in p.parts or p.suffix == ".log" or p.name == "status.json" for p in written
    )
    assert all(allowed), written


# ------------------------------------------------------------------------------ offline errors
def test_a_missing_model_is_one_line_naming_the_id_and_the_download(
    tmp_path: Path, artifacts: Path
) -> None:
    env = hf_env(tmp_path)
    proc = run_entrypoint("train_sft", ["model=qwen3-0.6b"], artifacts, check=False, env=env)
    line = one_error_line(proc)
    assert line == (
        "error: model.model_name_or_path='Qwen/Qwen3-0.6B' is not in the local Hugging Face "
        f"cache ({env['HF_HUB_CACHE']}) and downloads are off (HF_HUB_OFFLINE=1); fetch it once "
        "with: HF_HUB_OFFLINE=0 python -m post_training.download model=qwen3-0.6b "
        "(or give the path of a local copy)"
    )
    assert_nothing_written(artifacts)


def test_a_missing_hub_dataset_is_one_line_naming_the_id_and_the_download(
    tmp_path: Path, artifacts: Path
) -> None:
    env = hf_env(tmp_path)
    proc = run_entrypoint("train_sft", ["dataset=alpaca"], artifacts, check=False, env=env)
    assert one_error_line(proc) == (
        "error: dataset.train.path='hf:tatsu-lab/alpaca' is not in the local Hugging Face cache "
        f"({env['HF_HUB_CACHE']}) and downloads are off (HF_HUB_OFFLINE=1); fetch it once with: "
        "HF_HUB_OFFLINE=0 python -m post_training.download dataset=alpaca"
    )
    assert_nothing_written(artifacts)


def test_online_an_unreachable_hub_is_one_line_naming_the_id(
    tmp_path: Path, artifacts: Path
) -> None:
    env = hf_env(tmp_path, offline=False)
    proc = run_entrypoint("train_sft", ["model=qwen3-0.6b"], artifacts, check=False, env=env)
    line = one_error_line(proc)
    assert line.startswith("error: model.model_name_or_path='Qwen/Qwen3-0.6B': ")
    assert f"the Hugging Face Hub ({CLOSED_PORT}) cannot be reached" in line
    assert_nothing_written(artifacts)


# ------------------------------------------------------------------------------ the download
def test_download_with_downloads_off_is_one_line_with_the_online_command(
    tmp_path: Path, artifacts: Path
) -> None:
    args = ["model=qwen3-0.6b", "dataset=alpaca"]
    proc = run_entrypoint("download", args, artifacts, check=False, env=hf_env(tmp_path))
    line = one_error_line(proc)
    assert line.startswith("error: downloads are off (HF_HUB_OFFLINE=1")
    assert line.endswith(
        "run HF_HUB_OFFLINE=0 python -m post_training.download model=qwen3-0.6b dataset=alpaca"
    )


def test_download_dry_run_lists_repos_patterns_and_cache_without_network(
    tmp_path: Path, artifacts: Path
) -> None:
    env = hf_env(tmp_path, offline=False)  # downloads on, but any request would fail
    args = ["model=qwen3-0.6b", "dataset=sharegpt", "dry_run=true"]
    proc = run_entrypoint("download", args, artifacts, env=env)
    out = proc.stdout
    cache = env["HF_HUB_CACHE"]
    assert f"the Hub cache is {cache}" in out
    assert "model Qwen/Qwen3-0.6B (revision main)" in out
    assert f"into:    {cache}/models--Qwen--Qwen3-0.6B" in out
    assert "config.json" in out and "*.safetensors" in out and "tokenizer*" in out
    assert "*.bin" in out.split("ignore:")[1] and "*.gguf" in out.split("ignore:")[1]
    assert "dataset anon8231489123/ShareGPT_Vicuna_unfiltered" in out
    assert "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json" in out  # its data_files
    assert "cached:  no" in out
    assert not Path(cache).exists()  # nothing fetched, not even a lock file


# ------------------------------------------------------------------------------ in the cache
def test_a_model_and_dataset_in_the_hub_cache_train_offline(
    tmp_path: Path, artifacts: Path
) -> None:
    env = hf_env(tmp_path)
    cache = Path(env["HF_HUB_CACHE"])
    initial = save_initial_model(tmp_path / "initial")  # config, tokenizer, template, weights
    snapshot = cache_repo(cache, MODEL_ID, initial)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ASSETS_DIR / "tiny-tasks" / "train.jsonl", data / "train.jsonl")
    cache_repo(cache, DATASET_ID, data, "dataset")
    model = [f"model.model_name_or_path={MODEL_ID}", "model.init_from_config=false"]
    dataset = [f"dataset.train.path=hf:{DATASET_ID}"]

    shown = run_entrypoint("download", [*model, *dataset], artifacts, env=env)  # nothing to fetch
    assert "everything is in the local cache already" in shown.stdout
    assert f"{MODEL_ID} (config, safetensors weights, tokenizer + chat template" in shown.stdout
    assert str(snapshot) in shown.stdout
    assert "python -m post_training.train_sft model.model_name_or_path=" in shown.stdout

    args = [*QUICK, *model, *dataset, "dataset.max_train_examples=64", "training_args.max_steps=2"]
    args.append("job_subdir=hub")
    run_entrypoint("train_sft", args, artifacts, env={**env, "HF_ENDPOINT": CLOSED_PORT})
    assert list(job_dir(artifacts, "hub").rglob("final-model/model.safetensors"))


def test_a_partial_snapshot_names_what_is_missing(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text("{}")
    cache = tmp_path / "hub"
    cache_repo(cache, MODEL_ID, files)
    needs = ModelNeeds(config=True, weights=True, tokenizer=True)
    problem = hub_cache.model_cache_problem(MODEL_ID, needs, cache_dir=str(cache))
    assert problem is not None and problem.startswith("is only partly in the local")
    assert "safetensors weights" in problem and "tokenizer files" in problem
    assert (
        hub_cache.model_cache_problem(MODEL_ID, ModelNeeds(weights=False), None, str(cache)) is None
    )


def test_a_cached_hub_dataset_subset_loads_offline(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    files = tmp_path / "repo"
    (files / "en").mkdir(parents=True)
    (files / "en" / "train.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    (files / "README.md").write_text(  # the card declares subsets; only "en" was fetched
        "---\nconfigs:\n- config_name: fr\n  data_files: fr/*.jsonl\n"
        "- config_name: en\n  data_files:\n  - split: train\n    path: en/*.jsonl\n---\n"
    )
    cache_repo(cache, DATASET_ID, files, "dataset")
    spec = {"path": f"hf:{DATASET_ID}", "config_name": "en", "cache_dir": str(tmp_path / "ds")}
    assert load_source(spec)["text"] == ["hello", "world"]
    with pytest.raises(DataError, match="is not in the local Hugging Face cache") as err:
        load_source({**spec, "path": "hf:post-training-tests/absent"}, where="dataset.eval")
    assert "fetch it once with: HF_HUB_OFFLINE=0 python -m post_training.download" in str(err.value)


def test_the_check_is_skipped_for_local_paths(tmp_path: Path) -> None:
    from post_training.data_sft.hub_datasets import check_hub_datasets, hub_sources

    local = {"train": {"path": str(ASSETS_DIR / "tiny-tasks" / "train.jsonl")}, "eval": None}
    assert hub_sources(local) == []
    check_hub_datasets({"dataset": local})
    hub = {"train": {"sources": [{"path": "hf:org/a"}, {"path": "org/b"}]}, "eval": None}
    assert [(s.where, s.repo_id) for s in hub_sources(hub)] == [
        ("dataset.train.sources[0]", "org/a"),
        ("dataset.train.sources[1]", "org/b"),
    ]
    with pytest.raises(ConfigError, match=r"^dataset.train.sources\[0\].path='hf:org/a' is not"):
        check_hub_datasets({"dataset": hub})
