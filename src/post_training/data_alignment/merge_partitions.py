"""Stage 6: assemble a stage's partitions into ``<stage dir>/merged``.

    python -m post_training.data_alignment.merge_partitions stage=prepare_train_dataset

Checks that every partition ``0 .. count-1`` is complete, that they share one partition count and
one config hash, and that no row ``id`` appears twice; then writes ``merged/rows.jsonl`` and a
manifest (the partitions' config hash, their manifests' row counts and times) atomically. Later
stages read ``merged/`` when it exists; re-running with the same partitions skips.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from post_training.data_alignment.partitions import (
    MERGED_DIR,
    assemble,
    iso_time,
    read_manifest,
    replace_dir,
    write_rows,
)
from post_training.data_alignment.pipeline import ALIGNMENT_STAGES
from post_training.data_alignment.stage import begin
from post_training.errors import ConfigError
from post_training.frame import entrypoint

log = logging.getLogger(__name__)
STAGE = "merge_partitions"


def merge(stage_dir: Path, overwrite: bool = False, expected_count: int | None = None) -> Path:
    """Merge the partitions of ``stage_dir`` (see the module docstring); returns ``merged/``."""
    started = time.time()
    rows, manifests = assemble(stage_dir)
    count = manifests[0]["partition"]["count"]
    if expected_count is not None and count != expected_count:
        raise ConfigError(
            f"{stage_dir}: its partitions are of count {count}, not "
            f"partition.count={expected_count}"
        )
    target = Path(stage_dir) / MERGED_DIR
    previous = read_manifest(target)
    config_hash = manifests[0]["config_hash"]
    same = previous is not None and previous.get("config_hash") == config_hash
    if same and not overwrite and previous.get("rows") == len(rows):
        log.info("%s: %s is up to date; skipping", STAGE, target)
        return target
    replace_dir(target, overwrite, "merged output (of other partitions)")
    write_rows(
        target,
        rows,
        {
            "stage": manifests[0]["stage"],
            "merged_by": STAGE,
            "partition": None,
            "config_hash": config_hash,
            "settings": manifests[0].get("settings"),
            "inputs": manifests[0].get("inputs"),
            "partitions": [
                {
                    "index": m["partition"]["index"],
                    "rows": m["rows"],
                    "finished": m.get("finished"),
                    "report": m.get("report"),
                }
                for m in manifests
            ],
            "started": iso_time(started),
            "finished": iso_time(time.time()),
            "seconds": round(time.time() - started, 3),
        },
    )
    log.info("%s: %d partitions, %d rows -> %s", STAGE, count, len(rows), target)
    return target


def run(cfg: DictConfig) -> Path:
    config, _ = begin(cfg)
    stage = config["stage"]
    if stage not in ALIGNMENT_STAGES or stage == STAGE:
        raise ConfigError(f"stage {stage!r}: one of {[s for s in ALIGNMENT_STAGES if s != STAGE]}")
    count = (config.get("partition") or {}).get("count")
    return merge(Path(config["stage_dir"]), bool(config.get("overwrite")), count)


main = entrypoint("merge-partitions")(run)


if __name__ == "__main__":
    main()
