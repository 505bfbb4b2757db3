"""Build a dataset mixture and save it for training.

    python -m post_training.data_sft.build_mixture [name=...] [mixture.total=...] [overwrite=true]

compose (Hydra) -> refuse an existing output unless overwrite -> load, transform and sample every
source -> optional eval split -> save a DatasetDict (train[/eval]) + manifest.json atomically ->
print per-source counts. Train on the result with ``path: local:<output_dir>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
from omegaconf import DictConfig

from post_training.data_sft.mixing import load_dataset_split
from post_training.data_sft.saved_datasets import (
    build_manifest,
    check_output_dir,
    format_sources,
    format_strata,
    save_splits,
    strata_counts,
)
from post_training.data_sft.splitting import split_dataset
from post_training.frame import entrypoint
from post_training.utils.config import register_resolvers, to_container

log = logging.getLogger(__name__)
register_resolvers()


def run(cfg: DictConfig) -> Path:
    """Build, split and save the mixture; returns the output directory."""
    datasets.disable_progress_bars()
    resolved = to_container(cfg)
    output_dir = Path(resolved["output_dir"])
    check_output_dir(output_dir, bool(resolved["overwrite"]))

    train, sources = load_dataset_split(resolved["mixture"], where="mixture")
    splits = {"train": train}
    extra = {}
    eval_split = resolved.get("eval_split")
    if eval_split:
        stratify_by = eval_split.get("stratify_by")
        splits["train"], splits["eval"] = split_dataset(
            train, eval_split.get("size"), eval_split.get("fraction"), stratify_by, cfg.seed
        )
        extra["eval_split"] = eval_split
        if stratify_by:
            extra["strata"] = strata_counts(splits, stratify_by)

    manifest = build_manifest(resolved, sources, splits, **extra)
    save_splits(splits, output_dir, manifest, bool(resolved["overwrite"]))
    print(format_sources(sources))
    if "strata" in extra:
        print(format_strata(extra["strata"], eval_split["stratify_by"]))
    sizes = ", ".join(f"{name} {len(ds)}" for name, ds in splits.items())
    print(f"Saved mixture '{resolved['name']}' ({sizes} rows) to {output_dir}")
    return output_dir


main = entrypoint("dataset-mixture")(run)


if __name__ == "__main__":
    main()
