"""Stage 5: training pairs with reference rewards, quantile rewards and reference log-probs.

    python -m post_training.data_alignment.prepare_train_dataset prepare.pairs=[best_worst]

Per input row, pairs of the kinds in ``prepare.pairs``:
- ``offline``: the row's own ``chosen`` / ``rejected``;
- ``best_worst``: the reference completions of highest and lowest reward (first on ties; empty
  completions are never picked);
- ``answer_worst``: the dataset's reference answer (``answer``, e.g. the SFT reply) vs the
  reference completion of lowest reward;
a pair whose rewards differ by ``prepare.min_reward_margin`` or less is skipped.
Each pair carries ``ref_rewards`` (the rewards of the prompt's reference completions),
``chosen_reward`` / ``rejected_reward``, the quantile rewards ``chosen_quantile_reward`` /
``rejected_quantile_reward`` (fraction of ``ref_rewards`` <= the reward, as QRPO defines them), and
``ref_chosen_logps`` / ``ref_rejected_logps`` when ``compute_ref_logprobs`` ran. Several inputs
(``prepare.inputs``) are mixed with ``weight`` / ``fraction`` / ``count`` as dataset mixtures are
(``data_sft.mixing``), seeded; the mix is computed whole and then partitioned, so partitions merge
into exactly the unpartitioned result. The rows are canonical preference rows: train on them with
``dataset=alignment-prepared dataset.train.path=<output>/merged/rows.jsonl``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from post_training.data_alignment.partitions import read_stage
from post_training.data_alignment.stage import begin, open_stage
from post_training.data_preference.pairs import validate_pair
from post_training.data_sft.mixing import SHUFFLE_STREAM, plan_counts, sample_indices, source_rng
from post_training.errors import ConfigError, DataError
from post_training.frame import entrypoint

log = logging.getLogger(__name__)
STAGE = "prepare_train_dataset"
PAIR_KINDS = ("offline", "best_worst", "answer_worst")
INPUT_KEYS = ("name", "path", "weight", "fraction", "count")
KEPT = ("answer", "task")  # carried from the input row when present (evaluation, analysis)


def _offline(row: Mapping[str, Any]) -> dict[str, Any] | None:
    if not (row.get("chosen") and row.get("rejected")):
        return None
    pair = {"chosen": row["chosen"], "rejected": row["rejected"]}
    for key in ("chosen_reward", "rejected_reward", "ref_chosen_logps", "ref_rejected_logps"):
        if row.get(key) is not None:
            pair[key] = row[key]
    return pair


def _usable(row: Mapping[str, Any]) -> list[int]:
    """Indices of the reference completions a pair may use: non-empty, and with a reference
    log-prob when they were computed (a completion too long for the model has none)."""
    texts = row.get("ref_completions") or []
    rewards = row.get("ref_rewards") or []
    if len(rewards) != len(texts):
        raise DataError(
            f"{len(texts)} ref_completions but {len(rewards)} ref_rewards (run compute_rewards "
            "on the completions)"
        )
    logps = row.get("ref_completions_logps")
    return [
        k
        for k, text in enumerate(texts)
        if text.strip() and (logps is None or logps[k] is not None)
    ]


def _pair(
    row: Mapping[str, Any],
    chosen: tuple[str, float, float | None],
    rejected: tuple[str, float, float | None],
) -> dict[str, Any]:
    """A pair from (text, reward, reference log-prob or None) of each side."""
    pair = {
        "chosen": [{"role": "assistant", "content": chosen[0]}],
        "rejected": [{"role": "assistant", "content": rejected[0]}],
        "chosen_reward": chosen[1],
        "rejected_reward": rejected[1],
    }
    if chosen[2] is not None and rejected[2] is not None:
        pair["ref_chosen_logps"], pair["ref_rejected_logps"] = chosen[2], rejected[2]
    return pair


def _completion(row: Mapping[str, Any], k: int) -> tuple[str, float, float | None]:
    logps = row.get("ref_completions_logps")
    return row["ref_completions"][k], row["ref_rewards"][k], None if logps is None else logps[k]


def _best_worst(row: Mapping[str, Any], margin: float, dropped: Counter) -> dict[str, Any] | None:
    """The reference completions of highest and lowest reward (first on ties)."""
    if not row.get("ref_completions"):
        dropped["best_worst_no_ref_completions"] += 1
        return None
    usable = _usable(row)
    if len(usable) < 2:
        dropped["best_worst_fewer_than_2_usable"] += 1
        return None
    rewards = row["ref_rewards"]
    best = max(usable, key=lambda k: (rewards[k], -k))
    worst = min(usable, key=lambda k: (rewards[k], k))
    if rewards[best] - rewards[worst] <= margin:
        dropped["best_worst_no_reward_margin"] += 1
        return None
    return _pair(row, _completion(row, best), _completion(row, worst))


def _answer_worst(row: Mapping[str, Any], margin: float, dropped: Counter) -> dict[str, Any] | None:
    """The dataset's reference answer vs the reference completion of lowest reward."""
    if row.get("answer") is None or not row.get("ref_completions"):
        dropped["answer_worst_no_answer_or_completions"] += 1
        return None
    if row.get("answer_reward") is None:
        raise DataError("no 'answer_reward': run compute_rewards on this input")
    usable = _usable(row)
    if not usable:
        dropped["answer_worst_no_usable_completion"] += 1
        return None
    worst = min(usable, key=lambda k: (row["ref_rewards"][k], k))
    if row["answer_reward"] - row["ref_rewards"][worst] <= margin:
        dropped["answer_worst_no_reward_margin"] += 1
        return None
    answer = (str(row["answer"]), row["answer_reward"], row.get("ref_answer_logps"))
    return _pair(row, answer, _completion(row, worst))


def build_pairs(
    rows: list[dict[str, Any]], name: str, kinds: list[str], margin: float, where: str
) -> tuple[list[dict[str, Any]], Counter]:
    """Canonical, validated preference rows of one input."""
    dropped: Counter[str] = Counter()
    out = []
    for row in rows:
        for kind in kinds:
            try:
                if kind == "offline":
                    pair = _offline(row)
                    if pair is None:
                        dropped["offline_missing"] += 1
                        continue
                else:
                    builder = _best_worst if kind == "best_worst" else _answer_worst
                    pair = builder(row, margin, dropped)
                    if pair is None:
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
    with open_stage(config, STAGE, settings, [s.source for s in sources]) as out:
        if out.done:
            return out.path
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
            order = source_rng(seed, SHUFFLE_STREAM).permutation(len(mixed))
            mixed = [mixed[i] for i in np.asarray(order)]
        if not mixed:
            raise DataError(f"{STAGE}: no pair was built ({report})")
        out.rows, out.report = partition.select(mixed), report
    return out.path


main = entrypoint("prepare-train-dataset")(run)


if __name__ == "__main__":
    main()
