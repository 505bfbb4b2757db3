"""Exact-match accuracy of greedy generations on a dataset's eval split, and lm-eval benchmarks.

    python -m post_training.evaluate model_path=<checkpoint dir> [dataset=<name>]
    python -m post_training.evaluate model_path=<dir> harness.tasks=[tiny_tasks,gsm8k]

Prompts are the conversation up to the last assistant turn, rendered with the checkpoint's own
chat template; the prediction is compared with the row's answer field (default: the content of
the last assistant turn) after stripping whitespace. Results, overall and per task, are printed
and written as JSON next to the model (:mod:`post_training.exact_match`).

``harness.tasks`` (non-empty) also runs EleutherAI's lm-eval harness on the checkpoint
(:mod:`post_training.harness`): results in ``<model_path>/eval-harness.json``, printed as a
table. The tasks are checked and their datasets read first, before any model is loaded. The
exact match on ``dataset`` runs too unless ``exact_match=false`` (its default follows
``dataset.exact_match``, as ``evaluation.at_end`` does in training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from post_training.errors import ConfigError
from post_training.exact_match import evaluate_checkpoint
from post_training.frame import entrypoint
from post_training.utils.config import to_container


def run(cfg: DictConfig) -> dict[str, Any]:
    resolved = to_container(cfg)
    model_path = Path(resolved["model_path"])
    harness_cfg = resolved["harness"]
    harness = None
    if harness_cfg["tasks"]:
        from post_training.harness import Harness

        if not (model_path / "config.json").is_file():
            raise ConfigError(f"model_path {model_path}: no config.json (not a model checkpoint)")
        harness = Harness(harness_cfg["tasks"], harness_cfg["include_path"])
    result: dict[str, Any] = {}
    if resolved["exact_match"]:
        result = evaluate_checkpoint(
            model_path,
            resolved["dataset"],
            resolved["max_examples"],
            resolved["max_new_tokens"],
            resolved["batch_size"],
            resolved["torch_dtype"],
            Path(resolved["output_file"]) if resolved["output_file"] else None,
        )
    if harness is not None:
        from post_training.harness import evaluate_checkpoint_harness

        result["harness"] = evaluate_checkpoint_harness(
            model_path, harness_cfg, resolved["torch_dtype"], harness
        )
    return result


main = entrypoint("evaluate")(run)


if __name__ == "__main__":
    main()
