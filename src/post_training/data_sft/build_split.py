"""Split a dataset into train / eval and save both for training.

    python -m post_training.data_sft.build_split [input.path=...] [eval_fraction=...] \
        [overwrite=true]

compose (Hydra) -> refuse an existing output unless overwrite -> load the input (a source, a
mixture or a saved dataset) as canonical messages -> deterministic (stratified) split -> save a
DatasetDict (train, eval) + manifest.json atomically -> print the rows per stratum.
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
    """Load, split and save; returns the output directory."""
    datasets.disable_progress_bars()
    resolved = to_container(cfg)
    output_dir = Path(resolved["output_dir"])
    check_output_dir(output_dir, bool(resolved["overwrite"]))

    dataset, sources = load_dataset_split(resolved["input"], where="input")
    stratify_by = resolved["stratify_by"]
    train, eval_ds = split_dataset(
        dataset, resolved["eval_size"], resolved["eval_fraction"], stratify_by, int(cfg.seed)
    )
    splits = {"train": train, "eval": eval_ds}
    strata = strata_counts(splits, stratify_by) if stratify_by else None

    manifest = build_manifest(resolved, sources, splits, strata=strata)
    save_splits(splits, output_dir, manifest, bool(resolved["overwrite"]))
    print(format_sources(sources))
    if strata:
        print(format_strata(strata, stratify_by))
    print(
        f"Saved '{resolved['name']}' (train {len(train)}, eval {len(eval_ds)} rows) to {output_dir}"
    )
    return output_dir


main = entrypoint("dataset-split")(run)


if __name__ == "__main__":
    main()
