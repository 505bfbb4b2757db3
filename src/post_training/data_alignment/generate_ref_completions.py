"""Stage 2: N completions per prompt sampled from the reference model.

    python -m post_training.data_alignment.generate_ref_completions \
        model.model_name_or_path=<sft checkpoint> model.init_from_config=false \
        generation.num_completions=4 generation.temperature=1.0 partition.index=0 partition.count=4

Adds to every input row ``ref_completions`` (N assistant replies, as text),
``ref_completions_num_tokens`` and ``ref_completions_truncated`` (no stop token within
``generation.max_new_tokens``). Sampling is reproducible per prompt (see ``generation.py``):
partitions, batch sizes and restarts do not change which completions a prompt gets.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from post_training.data_alignment.generation import (
    SamplingOptions,
    generate_hf,
    generate_vllm,
    resolve_backend,
)
from post_training.data_alignment.partitions import read_stage
from post_training.data_alignment.stage import (
    begin,
    chat_encoder,
    check_user_turn,
    device,
    model_identity,
    open_stage,
    prompt_ids,
    shard_map,
)
from post_training.frame import entrypoint
from post_training.modeling.loading import load_model, load_tokenizer, stop_token_ids

log = logging.getLogger(__name__)
STAGE = "generate_ref_completions"


def run(cfg: DictConfig) -> Path:
    config, partition = begin(cfg)
    options = SamplingOptions(**config["generation"])
    backend = resolve_backend(options.backend)
    source = read_stage(config["input"], "input")
    settings = {
        "model": model_identity(config["model"]),
        "data": config["data"],
        "generation": config["generation"],
    }
    with open_stage(config, STAGE, settings, [source.source]) as out:
        if out.done:
            return out.path
        rows = partition.select(source.rows)
        check_user_turn(rows, f"input {config['input']}")
        tokenizer = load_tokenizer(config["model"])
        encoder = chat_encoder(config, tokenizer)
        prompts = prompt_ids(encoder, [r["prompt"] for r in rows])
        stops = stop_token_ids(config["model"], tokenizer)
        ids = [str(r["id"]) for r in rows]
        if backend == "vllm":
            completions = generate_vllm(config["model"], prompts, ids, options, stops)
        else:
            model = load_model(config["model"], tokenizer).to(device())
            items = list(zip(prompts, ids, strict=True))
            completions = shard_map(
                items,
                lambda part: generate_hf(
                    model, tokenizer, [p for p, _ in part], [i for _, i in part], options, stops
                ),
                out.accelerator,
            )
        out.rows = [
            {
                **row,
                "ref_completions": [c.text for c in samples],
                "ref_completions_num_tokens": [c.num_tokens for c in samples],
                "ref_completions_truncated": [c.truncated for c in samples],
            }
            for row, samples in zip(rows, completions, strict=True)
        ]
        flat = [c for samples in completions for c in samples]
        out.report = {
            "backend": backend,
            "prompts": len(rows),
            "completions": len(flat),
            "truncated_fraction": sum(c.truncated for c in flat) / max(len(flat), 1),
            "mean_tokens": sum(c.num_tokens for c in flat) / max(len(flat), 1),
            "empty": sum(not c.text.strip() for c in flat),
        }
        if out.report["truncated_fraction"] > 0.1:
            log.warning(
                "%s: %.0f%% of the completions hit generation.max_new_tokens=%d without a stop "
                "token; raise it (alignment.max_new_tokens) if they are cut short",
                STAGE,
                100 * out.report["truncated_fraction"],
                options.max_new_tokens,
            )
    return out.path


main = entrypoint("generate-ref-completions")(run)


if __name__ == "__main__":
    main()
