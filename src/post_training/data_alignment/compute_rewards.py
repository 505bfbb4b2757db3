"""Stage 4: rewards of the chosen, rejected and reference completions.

    python -m post_training.data_alignment.compute_rewards reward.function=exact_match
    python -m post_training.data_alignment.compute_rewards reward.function=null \
        reward.model.model_name_or_path=<a sequence-classification reward model>

Adds ``chosen_reward`` / ``rejected_reward`` to rows with an offline pair, ``answer_reward`` to
rows with a reference answer, and ``ref_rewards`` (one per reference completion) to rows with
``ref_completions``. A reward that is NaN or
infinite is an error naming the row and the completion.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from post_training.data_alignment.partitions import read_stage
from post_training.data_alignment.rewards import RewardModel, resolve_reward_function
from post_training.data_alignment.stage import begin, device, finite, open_stage, shard_map
from post_training.errors import ConfigError, DataError
from post_training.frame import entrypoint

log = logging.getLogger(__name__)
STAGE = "compute_rewards"


def _text(reply: Any) -> str:
    if isinstance(reply, str):
        return reply
    return "".join(str(m.get("content") or "") for m in reply)


def completions_of(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(slot, text)`` of every completion of a row to score: chosen, rejected, the dataset's
    reference ``answer``, ref_<k>."""
    out = [(side, _text(row[side])) for side in ("chosen", "rejected") if row.get(side)]
    if row.get("answer") is not None:
        out.append(("answer", str(row["answer"])))
    out += [(f"ref_{k}", text) for k, text in enumerate(row.get("ref_completions") or [])]
    return out


def run(cfg: DictConfig) -> Path:
    config, partition = begin(cfg)
    options = config["reward"]
    if bool(options.get("function")) == bool(
        (options.get("model") or {}).get("model_name_or_path")
    ):
        raise ConfigError(
            "reward: set exactly one of reward.function (a registered reward function) and "
            "reward.model.model_name_or_path (a sequence-classification reward model)"
        )
    function = (
        resolve_reward_function(options["function"], options.get("module"))
        if options.get("function")
        else None
    )
    source = read_stage(config["input"], "input")
    settings = {"reward": options}
    with open_stage(config, STAGE, settings, [source.source]) as out:
        if out.done:
            return out.path
        rows = partition.select(source.rows)
        slots = [
            (i, slot, text) for i, row in enumerate(rows) for slot, text in completions_of(row)
        ]
        if not slots:
            raise DataError(
                f"input {config['input']}: no completion to score (no chosen / rejected and no "
                "ref_completions): run generate_ref_completions first"
            )
        counts = {len(r.get("ref_completions") or []) for r in rows if "ref_completions" in r}
        if len(counts) > 1 or (counts and any("ref_completions" not in r for r in rows)):
            missing = next((r["id"] for r in rows if not r.get("ref_completions")), None)
            raise DataError(
                f"input {config['input']}: reference completions are missing or uneven (counts "
                f"{sorted(counts)}; first row without any: {missing!r})"
            )
        if function is not None:
            scores = []
            for i, _, text in slots:
                try:
                    scores.append(float(function(text, rows[i])))
                except DataError as err:
                    where = f"input {config['input']}: row {rows[i]['id']!r}"
                    raise DataError(f"{where}: {err}") from None
        else:
            model = RewardModel(options["model"], device())
            scores = shard_map(
                slots,
                lambda part: model.score(
                    [rows[i]["prompt"] for i, _, _ in part], [t for _, _, t in part]
                ),
                out.accelerator,
            )
        # ref_rewards of an earlier run are dropped: re-scored below.
        rescored = [{k: v for k, v in row.items() if k != "ref_rewards"} for row in rows]
        for (i, slot, _), score in zip(slots, scores, strict=True):
            value = finite(
                score, f"input {config['input']}: row {rows[i]['id']!r}: reward of {slot}"
            )
            if slot.startswith("ref_"):
                rescored[i].setdefault("ref_rewards", []).append(value)
            else:
                rescored[i][f"{slot}_reward"] = value
        values = [float(s) for s in scores]
        report = {
            "scored": len(values),
            "mean": sum(values) / len(values),
            "min": min(values),
            "max": max(values),
            "source": options.get("function") or options["model"]["model_name_or_path"],
        }
        out.rows, out.report = rescored, report
    return out.path


main = entrypoint("compute-rewards")(run)


if __name__ == "__main__":
    main()
