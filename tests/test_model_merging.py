"""Model merging with real mergekit on fine-tunes of the embedded tiny model.

The "fine-tunes" are the tiny model (``init_seed`` 0) plus seeded Gaussian perturbations, saved
like a trainer's final model (safetensors + tokenizer). Merges run in-process through the same
``run`` the entrypoint calls; one end-to-end test goes through the command line and `evaluate`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from post_training.errors import ConfigError
from post_training.merge import run
from post_training.model_merging.plan import (
    CONFIG_FILE,
    MANIFEST_FILE,
    build_merge_config,
    validate,
)
from post_training.modeling.loading import load_model, load_tokenizer
from post_training.utils.config import CONFIGS_DIR, to_container

from .conftest import run_entrypoint

METHODS = sorted(p.stem for p in (CONFIGS_DIR / "model_merging").glob("*.yaml"))
NOISE = {1: 0.01, 2: 0.02, 3: 0.03}  # seed -> scale of the perturbation of each fine-tune


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * NOISE[seed])
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """base (the tiny model), ft1..ft3 (perturbed copies), and incompatible checkpoints."""
    root = tmp_path_factory.mktemp("ckpts")
    model_cfg = OmegaConf.to_container(
        OmegaConf.load(CONFIGS_DIR / "model" / "tiny.yaml"), resolve=True
    )
    tokenizer = load_tokenizer(model_cfg)
    base = load_model(model_cfg, tokenizer)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for seed in NOISE:
        paths[f"ft{seed}"] = root / f"ft{seed}"
        _perturbed(base, seed).save_pretrained(paths[f"ft{seed}"])
        tokenizer.save_pretrained(paths[f"ft{seed}"])
    # Same tensors, another architecture (Mistral has Llama's tensor names and shapes).
    paths["mistral"] = root / "mistral"
    shutil.copytree(paths["ft1"], paths["mistral"])
    config = json.loads((paths["mistral"] / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (paths["mistral"] / "config.json").write_text(json.dumps(config))
    # Same architecture, other shapes.
    paths["narrow"] = root / "narrow"
    narrow_config = AutoConfig.from_pretrained(model_cfg["model_name_or_path"])
    narrow_config.intermediate_size = 256
    AutoModelForCausalLM.from_config(narrow_config).save_pretrained(paths["narrow"])
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    return SimpleNamespace(**paths)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def compose_merge(artifacts: Path, *overrides: str):
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        return compose(
            config_name="model-merging", overrides=[f"artifacts_dir={artifacts}", *overrides]
        )


def merge(artifacts: Path, *overrides: str) -> Path:
    return run(compose_merge(artifacts, *overrides))


def models(*paths: Path) -> str:
    return f"model_merging.models=[{','.join(map(str, paths))}]"


def assert_all_close(result: dict, expected: dict, atol: float = 1e-6) -> None:
    assert sorted(result) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(result[name], tensor, atol=atol, rtol=0, msg=name)


def nonzero_fraction(merged: dict, base: dict, name: str) -> float:
    return ((merged[name] - base[name]) != 0).sum().item() / base[name].numel()


# --- Configs ----------------------------------------------------------------------------------


def test_methods_shipped() -> None:
    assert set(METHODS) >= {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "slerp",
        "breadcrumbs",
    }


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_is_accepted_by_mergekit(
    method: str, ckpts: SimpleNamespace, artifacts: Path
) -> None:
    base = [] if method == "linear" else [f"model_merging.base_model={ckpts.base}"]
    inputs = [ckpts.ft1] if method == "slerp" else [ckpts.ft1, ckpts.ft2]
    cfg = to_container(compose_merge(artifacts, f"model_merging={method}", *base, models(*inputs)))
    assert cfg["model_merging"]["method"] == method
    assert cfg["trust_remote_code"] is False and cfg["overwrite"] is False
    assert cfg["output_dir"] == f"{artifacts}/private/models/merged/dev-{method}"
    plan = validate(cfg)
    merge_config = build_merge_config(plan)
    assert merge_config.merge_method == method
    assert [str(m.model.model.path) for m in merge_config.models] == [str(p) for p in inputs]


# --- Numerics ---------------------------------------------------------------------------------


def test_linear_is_the_weighted_average(ckpts: SimpleNamespace, artifacts: Path) -> None:
    t1, t2, t3 = weights(ckpts.ft1), weights(ckpts.ft2), weights(ckpts.ft3)
    out = merge(
        artifacts,
        "model_merging=linear",
        models(ckpts.ft1, ckpts.ft2),
        "model_merging.model_parameters.weight=[1.0,3.0]",
        "name=normalized",
    )
    assert_all_close(weights(out), {k: (t1[k] + 3 * t2[k]) / 4 for k in t1})

    out = merge(
        artifacts,
        "model_merging=linear",
        f"model_merging.models=[{ckpts.ft1},{{path:{ckpts.ft2},weight:0.3}},{ckpts.ft3}]",
        "model_merging.model_parameters.weight=[0.2,0.9,0.5]",  # models[1] overrides 0.9
        "model_merging.parameters.normalize=false",
        "name=raw",
    )
    assert_all_close(weights(out), {k: 0.2 * t1[k] + 0.3 * t2[k] + 0.5 * t3[k] for k in t1})


def test_task_arithmetic_adds_scaled_task_vectors(ckpts: SimpleNamespace, artifacts: Path) -> None:
    base, t1, t2 = weights(ckpts.base), weights(ckpts.ft1), weights(ckpts.ft2)
    out = merge(
        artifacts,
        "model_merging=task_arithmetic",
        f"model_merging.base_model={ckpts.base}",
        models(ckpts.ft1, ckpts.ft2),
        "model_merging.model_parameters.weight=[0.5,1.5]",
        "model_merging.parameters.lambda=0.7",
    )
    expected = {
        k: base[k] + 0.7 * (0.5 * (t1[k] - base[k]) + 1.5 * (t2[k] - base[k])) for k in base
    }
    assert_all_close(weights(out), expected)


def ties_reference(
    base: torch.Tensor, thetas: list, weights_: list, density: float
) -> torch.Tensor:
    """TIES (arXiv 2306.01708): trim to the top-k magnitudes, elect signs, disjoint mean."""
    deltas = []
    for theta, w in zip(thetas, weights_, strict=True):
        delta = (theta - base).flatten()
        keep = torch.zeros_like(delta)
        keep[delta.abs().topk(max(1, int(density * delta.numel()))).indices] = 1
        deltas.append(w * delta * keep)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights_).unsqueeze(1)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == elected).float()
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + ((stacked * agree).sum(0) / divisor).view_as(base)


def test_ties_keeps_density_and_matches_the_paper(ckpts: SimpleNamespace, artifacts: Path) -> None:
    base, t1, t2 = weights(ckpts.base), weights(ckpts.ft1), weights(ckpts.ft2)
    common = ("model_merging=ties", f"model_merging.base_model={ckpts.base}")
    single = weights(
        merge(artifacts, *common, models(ckpts.ft1), "model_merging.model_parameters.density=0.3")
    )
    for name in base:
        n = base[name].numel()
        assert nonzero_fraction(single, base, name) == pytest.approx(int(0.3 * n) / n, abs=1e-9)
        delta = single[name] - base[name]
        kept = delta != 0  # the kept entries are the task vector's, unscaled (one model)
        torch.testing.assert_close(delta[kept], (t1[name] - base[name])[kept], atol=1e-6, rtol=0)

    pair = weights(
        merge(
            artifacts,
            *common,
            models(ckpts.ft1, ckpts.ft2),
            "model_merging.model_parameters.weight=[0.6,0.4]",
            "model_merging.model_parameters.density=0.4",
            "name=pair",
        )
    )
    expected = {k: ties_reference(base[k], [t1[k], t2[k]], [0.6, 0.4], 0.4) for k in base}
    assert_all_close(pair, expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_density_rescales_and_is_seeded(
    method: str, ckpts: SimpleNamespace, artifacts: Path
) -> None:
    base, t1 = weights(ckpts.base), weights(ckpts.ft1)
    common = (
        f"model_merging={method}",
        f"model_merging.base_model={ckpts.base}",
        models(ckpts.ft1),
        "model_merging.model_parameters.density=0.3",
    )
    first = weights(merge(artifacts, *common, "seed=1", "name=a"))
    again = weights(merge(artifacts, *common, "seed=1", "name=b"))
    other = weights(merge(artifacts, *common, "seed=2", "name=c"))

    kept = total = 0
    for name in base:
        n = base[name].numel()
        fraction = nonzero_fraction(first, base, name)
        kept, total = kept + fraction * n, total + n
        if n >= 10_000:  # Bernoulli(0.3) per entry: within 5 standard deviations
            assert abs(fraction - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5, name
        # rescale=true: the kept entries carry the task vector's whole L1 norm
        l1 = (first[name] - base[name]).abs().sum()
        torch.testing.assert_close(l1, (t1[name] - base[name]).abs().sum(), rtol=1e-4, atol=0)
    assert abs(kept / total - 0.3) < 0.005
    assert all(torch.equal(first[k], again[k]) for k in first), "same seed, other weights"
    assert any(not torch.equal(first[k], other[k]) for k in first), "seed has no effect"


def test_slerp_endpoints(ckpts: SimpleNamespace, artifacts: Path) -> None:
    base, t1 = weights(ckpts.base), weights(ckpts.ft1)
    common = ("model_merging=slerp", f"model_merging.base_model={ckpts.base}", models(ckpts.ft1))
    assert_all_close(
        weights(merge(artifacts, *common, "model_merging.parameters.t=0", "name=0")), base
    )
    assert_all_close(
        weights(merge(artifacts, *common, "model_merging.parameters.t=1", "name=1")), t1
    )
    middle = weights(merge(artifacts, *common, "model_merging.parameters.t=0.5", "name=h"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(middle[name], base[name]) and not torch.allclose(
        middle[name], t1[name]
    )


# --- The merged checkpoint --------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merged_dir_is_a_checkpoint_with_tokenizer_config_and_manifest(
    ckpts: SimpleNamespace, artifacts: Path
) -> None:
    out = merge(
        artifacts,
        "model_merging=ties",
        f"model_merging.base_model={ckpts.base}",
        models(ckpts.ft1, ckpts.ft2),
        "job_subdir=sft-dpo",
    )
    assert out == artifacts / "private" / "models" / "merged" / "sft-dpo-ties"
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert sha256(out / file) == sha256(ckpts.base / file), file
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert_all_close(
        {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, weights(out), 0
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort 3 1 2"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["method"] == "ties"
    assert manifest["base_model"]["path"] == str(ckpts.base)
    assert manifest["base_model"]["weights"]["model.safetensors"]["sha256"] == sha256(
        ckpts.base / "model.safetensors"
    )
    assert [m["path"] for m in manifest["models"]] == [str(ckpts.ft1), str(ckpts.ft2)]
    for entry, path in zip(manifest["models"], (ckpts.ft1, ckpts.ft2), strict=True):
        assert entry["weights"]["model.safetensors"]["sha256"] == sha256(path / "model.safetensors")
        assert entry["parameters"] == {"weight": 1.0, "density": 0.5}
    assert manifest["merged_weights"]["model.safetensors"]["sha256"] == sha256(
        out / "model.safetensors"
    )
    assert manifest["versions"]["mergekit"]
    frozen = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert frozen["output_dir"] == str(out) and frozen["model_merging"]["method"] == "ties"
    assert frozen["model_merging"]["models"] == [str(ckpts.ft1), str(ckpts.ft2)]


# --- Bad configs: one ConfigError naming the key, nothing written ------------------------------


BAD = {
    "missing path": (
        lambda c: ["model_merging=linear", f"model_merging.models=[{c.ft1},/no/such/ckpt]"],
        r"model_merging\.models\[1\]='/no/such/ckpt': no such checkpoint directory",
    ),
    "not a checkpoint": (
        lambda c: ["model_merging=linear", models(c.ft1, c.empty)],
        r"model_merging\.models\[1\]=.*: no config\.json",
    ),
    "other architecture": (
        lambda c: [
            "model_merging=ties",
            f"model_merging.base_model={c.base}",
            models(c.ft1, c.mistral),
        ],
        r"model_merging\.models\[1\]=.*MistralForCausalLM.*differs from model_merging\.base_model",
    ),
    "other shapes": (
        lambda c: ["model_merging=linear", models(c.ft1, c.narrow)],
        r"model_merging\.models\[1\]=.*tensor shapes differ.*mlp\.down_proj\.weight",
    ),
    "unknown method": (
        lambda c: ["model_merging=linear", "model_merging.method=soup", models(c.ft1, c.ft2)],
        r"model_merging\.method: unknown merge method 'soup'",
    ),
    "weights do not match models": (
        lambda c: [
            "model_merging=linear",
            models(c.ft1, c.ft2),
            "model_merging.model_parameters.weight=[0.2,0.3,0.5]",
        ],
        r"model_merging\.model_parameters\.weight: 3 values for 2 models",
    ),
    "missing weight": (
        lambda c: [
            "model_merging=linear",
            models(c.ft1, c.ft2),
            "model_merging.model_parameters.weight=null",
        ],
        r"model_merging\.models\[0\]\.weight: linear needs a weight for every model",
    ),
    "unknown parameter": (
        lambda c: [
            "model_merging=linear",
            models(c.ft1, c.ft2),
            "+model_merging.model_parameters.densty=0.5",
        ],
        r"model_merging\.model_parameters\.densty: linear has no per-model parameter",
    ),
    "density out of range": (
        lambda c: [
            "model_merging=ties",
            f"model_merging.base_model={c.base}",
            f"model_merging.models=[{c.ft1},{{path:{c.ft2},density:1.5}}]",
        ],
        r"model_merging\.models\[1\]\.density=1\.5: density must be in \(0, 1\]",
    ),
    "no base model": (
        lambda c: ["model_merging=ties", "model_merging.base_model=null", models(c.ft1, c.ft2)],
        r"model_merging\.base_model: ties needs a base model",
    ),
    "slerp of three": (
        lambda c: [
            "model_merging=slerp",
            f"model_merging.base_model={c.base}",
            models(c.ft1, c.ft2),
        ],
        r"model_merging\.models: slerp merges 2 checkpoints counting base_model; got 2 model",
    ),
    "models not set": (
        lambda c: ["model_merging=ties", f"model_merging.base_model={c.base}"],
        r"model_merging\.models: missing value",
    ),
    "same model twice": (
        lambda c: ["model_merging=linear", models(c.ft1, c.ft1)],
        r"model_merging\.models\[1\]=.*: the same checkpoint as model_merging\.models\[0\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_clear_error_before_anything_is_written(
    case: str, ckpts: SimpleNamespace, artifacts: Path
) -> None:
    overrides, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        merge(artifacts, *overrides(ckpts))
    assert list(artifacts.iterdir()) == []


def test_existing_output_dir_is_kept_unless_overwrite(
    ckpts: SimpleNamespace, artifacts: Path
) -> None:
    common = ("model_merging=linear", models(ckpts.ft1, ckpts.ft2), "name=soup")
    out = merge(artifacts, *common)
    before = {p.name: sha256(p) for p in out.iterdir()}
    with pytest.raises(
        ConfigError, match=r"output_dir='.*/soup' already exists; set overwrite=true"
    ):
        merge(artifacts, *common, "model_merging.model_parameters.weight=[1.0,0.0]")
    assert {p.name: sha256(p) for p in out.iterdir()} == before

    merge(artifacts, *common, "model_merging.model_parameters.weight=[1.0,0.0]", "overwrite=true")
    assert_all_close(weights(out), weights(ckpts.ft1))
    assert sorted(p.name for p in out.parent.iterdir()) == ["soup"]  # no temporary dirs left

    not_a_merge = artifacts / "private" / "models" / "merged" / "notes"
    not_a_merge.mkdir()
    (not_a_merge / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds no merge_manifest\.json"):
        merge(artifacts, *common, "name=notes", "overwrite=true")
    assert (not_a_merge / "keep.txt").read_text() == "mine"


def test_output_dir_may_not_replace_an_input(ckpts: SimpleNamespace, artifacts: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"output_dir=.* would replace the input model_merging\.models\[0\]"
    ):
        merge(
            artifacts,
            "model_merging=linear",
            models(ckpts.ft1, ckpts.ft2),
            f"output_dir={ckpts.ft1}",
            "overwrite=true",
        )
    assert (ckpts.ft1 / "model.safetensors").is_file()


# --- End to end -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_entrypoint_merges_and_evaluate_runs_on_the_result(
    ckpts: SimpleNamespace, artifacts: Path
) -> None:
    args = [
        "model_merging=dare_ties",
        f"model_merging.base_model={ckpts.base}",
        f"model_merging.models=[{{path:{ckpts.ft1},weight:0.7}},{{path:{ckpts.ft2},weight:0.3}}]",
        "job_subdir=e2e",
    ]
    proc = run_entrypoint("merge", args, artifacts, timeout=300)
    out = artifacts / "private" / "models" / "merged" / "e2e-dare_ties"
    assert f"written to {out}" in proc.stdout
    assert (out / MANIFEST_FILE).is_file()
    runs = list((artifacts / "private" / "outputs" / "model_merging" / "e2e" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / ".hydra" / "config.yaml").is_file()

    # The old entrypoint path is an alias of the same main.
    again = run_entrypoint("model_merging.model_merging", args, artifacts, check=False, timeout=300)
    assert again.returncode != 0 and "set overwrite=true" in again.stderr

    run_entrypoint(
        "evaluate", [f"model_path={out}", "dataset=tiny-tasks", "max_examples=16"], artifacts
    )
    result = json.loads((out / "eval-tiny-tasks.json").read_text())
    assert result["num_examples"] == 16 and 0.0 <= result["accuracy"] <= 1.0
