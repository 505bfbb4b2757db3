"""Exact-match accuracy of greedy generations on a dataset's eval split.

    python -m post_training.evaluate model_path=<checkpoint dir> [dataset=<name>]

Prompts are the conversation up to the last assistant turn, rendered with the checkpoint's own
chat template; the prediction is compared with the row's answer field (default: the content of
the last assistant turn) after stripping whitespace. Results, overall and per task, are printed
and written as JSON next to the model (:mod:`post_training.exact_match`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from post_training.exact_match import evaluate_checkpoint
from post_training.frame import entrypoint
from post_training.utils.config import to_container


def run(cfg: DictConfig) -> dict[str, Any]:
    resolved = to_container(cfg)
    return evaluate_checkpoint(
        Path(resolved["model_path"]),
        resolved["dataset"],
        resolved["max_examples"],
        resolved["max_new_tokens"],
        resolved["batch_size"],
        resolved["torch_dtype"],
        Path(resolved["output_file"]) if resolved["output_file"] else None,
    )


main = entrypoint("evaluate")(run)


if __name__ == "__main__":
    main()
