"""Stage 5: training pairs with reference rewards, quantile rewards and reference log-probs.

    python -m post_training.data_alignment.prepare_train_dataset prepare.pairs=[best_worst]

Per input row, pairs of the kinds in ``prepare.pairs``:
- ``offline``: the row's own ``chosen`` / ``rejected``;
- ``best_worst``: the reference completions of highest and lowest reward (first on ties; empty
  completions are never picked), skipped when the rewards differ by ``prepare.min_reward_margin``
  or less.
Each pair carries ``ref_rewards`` (the rewards of the prompt's reference completions),
``chosen_reward`` / ``rejected_reward``, the quantile rewards ``chosen_quantile_reward`` /
``rejected_quantile_reward`` (fraction of ``ref_rewards`` <= the reward, as QRPO defines them), and
``ref_chosen_logps`` / ``ref_rejected_logps`` when ``compute_ref_logprobs`` ran. Several inputs
(``prepare.inputs``) are mixed with ``weight`` / ``fraction`` / ``count`` as dataset mixtures are
(``data_sft.mixture``), seeded; the mix is computed whole and then partitioned, so partitions merge
into exactly the unpartitioned result. The rows are canonical preference rows: train on them with
``dataset=alignment-prepared dataset.train.path=<output>/merged/rows.jsonl``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from post_training.data_alignment.partitions import read_stage
from post_training.data_alignment.preference import validate_pair
from post_training.data_alignment.stage import begin, now, stage_output
from post_training.data_sft.messages import DataError
from post_training.data_sft.mixture import plan_counts, sample_indices, source_rng
from post_training.utils.config import ConfigError

log = logging.getLogger(__name__)
STAGE = "prepare_train_dataset"
PAIR_KINDS = ("offline", "best_worst")
INPUT_KEYS = ("name", "path", "weight", "fraction", "count")
KEPT = ("answer", "task")  # carried from the input row when present (evaluation, analysis)


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _offline(row: Mapping[str, Any]) -> dict[str, Any] | None:
    if not (row.get("chosen") and row.get("rejected")):
        return None
    pair = {"chosen": row["chosen"], "rejected": row["rejected"]}
    for key in ("chosen_reward", "rejected_reward", "ref_chosen_logps", "ref_rejected_logps"):
        if row.get(key) is not None:
            pair[key] = row[key]
    return pair


def _best_worst(row: Mapping[str, Any], margin: float, dropped: Counter) -> dict[str, Any] | None:
    texts = row.get("ref_completions") or []
    rewards = row.get("ref_rewards") or []
    if not texts:
        return None
    if len(rewards) != len(texts):
        raise DataError(
            f"row {row['id']!r}: {len(texts)} ref_completions but {len(rewards)} ref_rewards "
            "(run compute_rewards on the completions)"
        )
    logps = row.get("ref_completions_logps")
    usable = [
        k
        for k, text in enumerate(texts)
        if text.strip() and (logps is None or logps[k] is not None)
    ]
    if len(usable) < 2:
        dropped["best_worst_fewer_than_2_usable"] += 1
        return None
    best = max(usable, key=lambda k: (rewards[k], -k))
    worst = min(usable, key=lambda k: (rewards[k], k))
    if rewards[best] - rewards[worst] <= margin:
        dropped["best_worst_no_reward_margin"] += 1
        return None
    pair = {
        "chosen": _reply(texts[best]),
        "rejected": _reply(texts[worst]),
        "chosen_reward": rewards[best],
        "rejected_reward": rewards[worst],
    }
    if logps is not None:
        pair["ref_chosen_logps"], pair["ref_rejected_logps"] = logps[best], logps[worst]
    return pair


def build_pairs(
    rows: list[dict[str, Any]], name: str, kinds: list[str], margin: float, where: str
) -> tuple[list[dict[str, Any]], Counter]:
    """Canonical, validated preference rows of one input."""
    dropped: Counter[str] = Counter()
    out = []
    for row in rows:
        for kind in kinds:
            try:
                pair = _offline(row) if kind == "offline" else _best_worst(row, margin, dropped)
                if pair is None:
                    if kind == "offline":
                        dropped["offline_missing"] += 1
                    continue
                pair["prompt"] = row["prompt"]
                if row.get("ref_rewards") is not None:
                    pair["ref_rewards"] = row["ref_rewards"]
                canonical = validate_pair(pair, None)
            except DataError as err:
                raise DataError(f"{where}: row {row.get('id')!r}: {err}") from None
            extra = {k: row[k] for k in KEPT if k in row}
            out.append({"id": f"{name}/{row['id']}/{kind}", "source": name, **extra, **canonical})
    return out, dropped


def _inputs(options: Mapping[str, Any]) -> list[dict[str, Any]]:
    inputs = options.get("inputs")
    if not inputs:
        raise ConfigError("prepare.inputs: give at least one {name, path} to prepare pairs from")
    out = []
    for i, spec in enumerate(inputs):
        unknown = sorted(set(spec) - set(INPUT_KEYS))
        if unknown or not spec.get("path"):
            raise ConfigError(
                f"prepare.inputs[{i}]: needs 'path'; keys {INPUT_KEYS}, got {dict(spec)}"
            )
        out.append({"name": spec.get("name") or f"input{i}", **spec})
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"prepare.inputs: names must differ, got {names}")
    return out


def run(cfg: DictConfig) -> Path:
    config, partition = begin(cfg)
    options = config["prepare"]
    kinds = list(options["pairs"])
    if not kinds or set(kinds) - set(PAIR_KINDS):
        raise ConfigError(f"prepare.pairs {kinds}: a non-empty list of {PAIR_KINDS}")
    inputs = _inputs(options)
    sources = [
        read_stage(spec["path"], f"prepare.inputs[{i}].path") for i, spec in enumerate(inputs)
    ]
    settings = {"prepare": {k: v for k, v in options.items() if k != "inputs"}}
    settings["inputs"] = [{k: v for k, v in s.items() if k != "path"} for s in inputs]
    output = stage_output(config, STAGE, settings, [s.source for s in sources])
    if output.is_complete():
        log.info("%s: %s is complete; skipping", STAGE, output.path)
        return output.path
    started = now()
    per_input, report = [], {}
    for spec, source in zip(inputs, sources, strict=True):
        pairs, dropped = build_pairs(
            source.rows,
            spec["name"],
            kinds,
            float(options["min_reward_margin"]),
            f"input {spec['path']}",
        )
        if options.get("require_ref_logps"):
            missing = next((p["id"] for p in pairs if "ref_chosen_logps" not in p), None)
            if missing is not None:
                raise DataError(
                    f"input {spec['path']}: pair {missing!r} has no reference log-probs "
                    "(prepare.require_ref_logps=true): run compute_ref_logprobs before"
                )
        per_input.append(pairs)
        report[spec["name"]] = {
            "rows": len(source.rows),
            "pairs": len(pairs),
            "dropped": dict(dropped),
        }
    counts = plan_counts(
        inputs, [len(p) for p in per_input], options.get("total"), "prepare.inputs"
    )
    seed = int(options["seed"])
    mixed: list[dict[str, Any]] = []
    for spec, pairs, k in zip(inputs, per_input, counts, strict=True):
        if k > len(pairs):
            raise DataError(
                f"prepare.inputs '{spec['name']}': {k} pairs requested, it has {len(pairs)}"
            )
        if k:
            picked = sample_indices(len(pairs), k, source_rng(seed, spec["name"]))
            mixed += [pairs[i] for i in picked]
        report[spec["name"]]["selected"] = k
    if options.get("shuffle", True):
        order = source_rng(seed, "\0shuffle").permutation(len(mixed))
        mixed = [mixed[i] for i in np.asarray(order)]
    if not mixed:
        raise DataError(f"{STAGE}: no pair was built ({report})")
    rows = partition.select(mixed)
    return output.write(
        rows, settings=settings, inputs=[s.source for s in sources], report=report, started=started
    )


@hydra.main(config_path="../configs", config_name="prepare-train-dataset", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
