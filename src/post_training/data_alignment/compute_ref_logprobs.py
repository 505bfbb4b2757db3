"""Stage 3: summed reference log-probs of the chosen, rejected and reference completions.

    python -m post_training.data_alignment.compute_ref_logprobs \
        model.model_name_or_path=<reference checkpoint> model.init_from_config=false

Tokenization, masks and forward are those of ``train_preference`` (same chat template, options
and ``encode_pairs``), so ``train_preference`` can use the columns instead of loading a reference
model: ``ref_chosen_logps`` / ``ref_rejected_logps`` for offline pairs, and
``ref_completions_logps`` (one per reference completion; null where the completion does not fit)
and ``ref_answer_logps`` (of the dataset's reference answer) for pairs that
``prepare_train_dataset`` builds from them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from post_training.data_alignment.partitions import read_stage
from post_training.data_alignment.stage import (
    begin,
    chat_encoder,
    device,
    model_identity,
    open_stage,
    shard_map,
)
from post_training.data_preference.encode import encode_pairs
from post_training.data_sft.tokenize import FilterReport
from post_training.data_sft.training_data import tokenizer_fingerprint
from post_training.errors import DataError
from post_training.frame import entrypoint
from post_training.modeling.loading import load_model, load_tokenizer
from post_training.trainers.reference import summed_logps

log = logging.getLogger(__name__)
STAGE = "compute_ref_logprobs"


def run(cfg: DictConfig) -> Path:
    config, partition = begin(cfg)
    options = config["ref_logprobs"]
    source = read_stage(config["input"], "input")
    settings = {
        "model": model_identity(config["model"]),
        "data": config["data"],
        "ref_logprobs": options,
    }
    with open_stage(config, STAGE, settings, [source.source]) as out:
        if out.done:
            return out.path
        rows = [dict(r) for r in partition.select(source.rows)]
        where = f"input {config['input']}"
        tokenizer = load_tokenizer(config["model"])
        encoder = chat_encoder(config, tokenizer)
        model = load_model(config["model"], tokenizer).to(device()).eval()
        batch_size = int(options["batch_size"])
        chunk = int(options.get("loss_chunk_size") or 0)
        with_completions = options["completions"]

        def score(examples: list[dict]) -> list:
            return list(summed_logps(model, examples, tokenizer.pad_token_id, batch_size, chunk))

        report: dict = {"tokenizer": tokenizer_fingerprint(tokenizer)}
        paired = [r for r in rows if r.get("chosen") and r.get("rejected")]
        if paired:
            limit = options.get("max_prompt_length") or encoder.options.max_seq_length - 1
            pair_report = FilterReport()
            pairs = encode_pairs(paired, encoder, where, int(limit), pair_report)
            for pair, (c, r) in zip(pairs, shard_map(pairs, score, out.accelerator), strict=True):
                row = paired[int(pair["row_index"])]
                row["ref_chosen_logps"], row["ref_rejected_logps"] = float(c), float(r)
            report["pairs"] = {"scored": len(pairs), "filter": pair_report.as_dict()}
            if len(pairs) < len(paired):
                # A pair the length policy dropped has no reference log-probs; kept, it would stop
                # train_preference ("has no 'ref_chosen_logps' while other rows have it"), and
                # that run would drop it under the same data options anyway.
                unscored = {id(r) for r in paired} - {
                    id(paired[int(p["row_index"])]) for p in pairs
                }
                rows = [r for r in rows if id(r) not in unscored]
                log.warning(
                    "%s: %d of %d pairs do not fit (%s) and are left out of the output",
                    STAGE,
                    len(unscored),
                    len(paired),
                    pair_report.dropped and dict(pair_report.dropped),
                )
        singles = [  # (row, slot, text): the reference answer and each reference completion
            (row, slot, text)
            for row in rows
            for slot, text in (
                ([("answer", str(row["answer"]))] if row.get("answer") is not None else [])
                + (list(enumerate(row.get("ref_completions") or [])) if with_completions else [])
            )
        ]
        if singles:
            conversations = [
                ([*row["prompt"], {"role": "assistant", "content": text}], len(row["prompt"]))
                for row, _, text in singles
            ]
            single_report = FilterReport()
            examples, kept = encoder.encode(conversations, where, single_report)
            values = dict(zip(kept, shard_map(examples, score, out.accelerator), strict=True))
            for row in rows:
                if row.get("ref_completions") and with_completions:
                    row["ref_completions_logps"] = [None] * len(row["ref_completions"])
            for i, (row, slot, _) in enumerate(singles):
                value = float(values[i]) if i in values else None
                if slot == "answer":
                    row["ref_answer_logps"] = value
                else:
                    row["ref_completions_logps"][slot] = value
            report["completions"] = {"scored": len(kept), "filter": single_report.as_dict()}
        if not paired and not singles:
            raise DataError(
                f"{where}: nothing to score: no row has chosen + rejected, an answer or "
                "ref_completions"
            )
        out.rows, out.report = rows, report
    return out.path


main = entrypoint("compute-ref-logprobs")(run)


if __name__ == "__main__":
    main()
