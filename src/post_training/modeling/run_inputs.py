"""What a training run reads from the Hugging Face Hub besides its model, checked before the
run dir is written: the reference model (``reference.model_name_or_path``) and every Hub dataset
of ``dataset`` and of ``evaluation.dataset`` (when the end-of-run evaluation reads it).

Offline (the default), each must be in the local cache; the error is one line naming the key,
the id and the command that fetches it (:mod:`post_training.utils.hub_cache`). No data is read.
"""

from __future__ import annotations

from typing import Any

from post_training.data_sft.hub_datasets import check_hub_datasets
from post_training.modeling.loading import check_model_path


def _dump(section: Any) -> dict[str, Any] | None:
    return None if section is None else section.model_dump()


def check_run_inputs(args: Any) -> None:
    """:class:`~post_training.errors.ConfigError` for the first Hub input of the typed config
    ``args`` (:mod:`post_training.schema`) that the run cannot get; the model itself is
    :func:`~post_training.modeling.loading.check_model_paths`'."""
    reference = getattr(getattr(args, "reference", None), "model_name_or_path", None)
    if reference:
        check_model_path(str(reference), "reference.model_name_or_path")
    datasets = {"dataset": _dump(getattr(args, "dataset", None))}
    evaluation = getattr(args, "evaluation", None)
    if evaluation is not None and getattr(evaluation, "at_end", False):
        datasets["evaluation.dataset"] = _dump(getattr(evaluation, "dataset", None))
    check_hub_datasets(datasets)
