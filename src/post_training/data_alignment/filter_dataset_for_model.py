"""Stage 1: the prompts (and offline pairs) of a dataset that fit the model, as alignment rows.

    python -m post_training.data_alignment.filter_dataset_for_model [dataset=...] [model=...]

Reads ``dataset`` (split ``alignment.split``) with its transform:
- an SFT dataset (``messages``): the prompt is the conversation before the last assistant turn,
  whose content becomes ``answer`` (what a reward function can compare with);
- a preference dataset (a preference transform such as ``preference``): ``prompt``, ``chosen``,
  ``rejected`` and any rewards are kept as the offline pair.

A row is kept when its templated prompt plus ``max_new_tokens`` fits ``model.max_seq_length``
(and ``filter.max_prompt_length`` if set), and, for offline pairs, when prompt + reply fits too.
Drops are counted per reason in the manifest's report. Output rows: ``id`` (``<split>-<row>``),
``prompt``, then ``answer`` / ``chosen`` / ``rejected`` / rewards / kept columns as present.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from post_training.data_alignment.rows import filter_rows, read_rows, split_spec
from post_training.data_alignment.stage import (
    begin,
    chat_encoder,
    check_user_turn,
    model_identity,
    open_stage,
)
from post_training.data_sft.hub_datasets import check_hub_datasets
from post_training.data_sft.training_data import spec_fingerprints
from post_training.errors import ConfigError
from post_training.frame import entrypoint
from post_training.modeling.loading import load_tokenizer

log = logging.getLogger(__name__)
STAGE = "filter_dataset_for_model"


def run(cfg: DictConfig) -> Path:
    config, partition = begin(cfg)
    check_hub_datasets({"dataset": config["dataset"]})  # offline: in the cache, or one line
    split = config["alignment"]["split"]
    options = config["filter"]
    settings = {
        "dataset": config["dataset"],
        "split": split,
        "filter": options,
        "max_new_tokens": config["alignment"]["max_new_tokens"],
        "model": model_identity(config["model"]),
        "data": config["data"],
    }
    inputs = [
        {
            "dataset": config["dataset"].get("name"),
            "fingerprints": spec_fingerprints(split_spec(config["dataset"], split)),
        }
    ]
    with open_stage(config, STAGE, settings, inputs) as out:
        if out.done:
            return out.path
        rows = read_rows(config["dataset"], split)
        check_user_turn(rows, f"dataset {config['dataset'].get('name')} ({split})")
        tokenizer = load_tokenizer(config["model"])
        encoder = chat_encoder(config, tokenizer, truncation="drop")
        max_new = int(config["alignment"]["max_new_tokens"])
        limit = options.get("max_prompt_length") or encoder.options.max_seq_length
        mine = partition.select(rows)
        kept, report = filter_rows(mine, encoder, int(limit), max_new)
        if not kept:
            raise ConfigError(
                f"{STAGE}: no row of partition {partition.name} fits the model "
                f"(max_seq_length {encoder.options.max_seq_length}, max_new_tokens {max_new}): "
                f"{report['dropped']}"
            )
        log.info(
            "%s: kept %d of %d rows; dropped %s", STAGE, len(kept), len(mine), report["dropped"]
        )
        out.rows, out.report = kept, report
    return out.path


main = entrypoint("filter-dataset-for-model")(run)


if __name__ == "__main__":
    main()
