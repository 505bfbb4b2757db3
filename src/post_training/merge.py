"""Merge checkpoints with mergekit, driven by a Hydra config.

    python -m post_training.merge model_merging=ties \
        model_merging.base_model=<sft dir> 'model_merging.models=[<dpo dir>,<dpo seed-2 dir>]'

compose (Hydra) -> validate (method, parameters, paths, architectures, tensor shapes, output dir;
nothing is written before this passes) -> mergekit config -> merge into a temporary dir next to
``output_dir`` -> resolved config + manifest of the inputs (paths, sha256 of their weight files)
-> rename into ``output_dir``. The result is a plain Hugging Face checkpoint (safetensors,
tokenizer, chat template) that ``transformers`` and ``post_training.evaluate`` load directly.
The planning lives in :mod:`post_training.model_merging.plan`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from post_training.errors import ConfigError
from post_training.frame import entrypoint
from post_training.model_merging.plan import (
    CONFIG_FILE,
    MANIFEST_FILE,
    build_manifest,
    build_merge_config,
    merge_options,
    validate,
    weight_hashes,
)
from post_training.utils.atomic import atomic_dir
from post_training.utils.config import register_resolvers, to_container

log = logging.getLogger(__name__)
register_resolvers()


def run(cfg: DictConfig) -> Path:
    """Validate, merge, write config and manifest; returns the merged model's directory."""
    try:
        resolved = to_container(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key}: missing value (set it on the command line)") from err
    plan = validate(resolved)
    merge_config = build_merge_config(plan)
    options = merge_options(resolved)
    log.info("Merging %d model(s) with %s into %s", len(plan.models), plan.method, plan.output_dir)
    manifest = build_manifest(plan, resolved)  # hashes the inputs before they are read

    from mergekit.merge import run_merge

    with atomic_dir(plan.output_dir) as tmp:
        config_source = yaml.safe_dump(merge_config.model_dump(mode="json", exclude_none=True))
        run_merge(merge_config, str(tmp), options, config_source=config_source)
        if resolved["copy_tokenizer"] and not (tmp / "tokenizer_config.json").is_file():
            log.warning("mergekit did not copy a tokenizer: copy one into %s", plan.output_dir)
        manifest["merged_weights"] = weight_hashes(tmp)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"Merged model ({plan.method}) written to {plan.output_dir}", flush=True)
    return plan.output_dir


main = entrypoint("model-merging")(run)


if __name__ == "__main__":
    main()
