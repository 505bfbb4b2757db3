"""Reference log-probs: one component decides where they come from, computes and caches them.

The mode is decided once, at set-up (:meth:`Reference.decide`):

* ``none``: the loss is reference-free (simpo, orpo); nothing is loaded;
* ``dataset``: every pair carries ``ref_chosen_logps`` / ``ref_rejected_logps`` (e.g. from the
  ``compute_ref_logprobs`` stage); nothing is loaded;
* ``model``: a frozen reference model (``reference.model_name_or_path``, default the policy's
  initial weights), placed like the policy (:meth:`Reference.prepare`);
* ``peft``: the policy itself with its LoRA adapters disabled.

With ``reference.precompute=true`` the ``model`` / ``peft`` modes run one pass before training
(:meth:`Reference.precompute`), cached under ``data.cache_dir/ref-logps`` by everything that
determines the numbers; the reference model is then freed and the batches carry the columns.

:func:`summed_logps` is the one loop that scores tokenized pairs (or single conversations) with
the forward and masks of training; the offline ``compute_ref_logprobs`` stage calls it too.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from post_training.data_sft.collate import pad_collate
from post_training.data_sft.training_data import tokenize_options, tokenizer_fingerprint
from post_training.errors import ConfigError
from post_training.trainers.preference import pair_statistics
from post_training.trainers.sft import sft_forward
from post_training.utils.atomic import atomic_file
from post_training.utils.config import config_hash
from post_training.utils.distributed import parameter_counts, sharding, zero3_inference_engine
from post_training.utils.progress import ItemProgress

log = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
MODES = ("none", "dataset", "model", "peft")


def adapters_off(model: torch.nn.Module):
    """A context in which a PEFT model runs without its adapters (the base model)."""
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    disable = getattr(inner, "disable_adapter", None)
    if disable is None:
        raise RuntimeError("reference mode 'peft' needs a PEFT policy")
    return disable()


@torch.no_grad()
def summed_logps(
    model: torch.nn.Module,
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    batch_size: int,
    chunk_size: int = 0,
    device: torch.device | None = None,
    without_adapters: bool = False,
    ld_alpha: float | None = None,
) -> np.ndarray:
    """Summed completion log-probs under ``model`` with the forward and masks of training:
    ``[n, 2]`` (chosen, rejected) for tokenized pairs (``encode_pairs``), ``[n]`` for single
    tokenized conversations. ``without_adapters``: the PEFT policy's base model;
    ``ld_alpha``: LD-DPO's sums of pairs (:func:`pair_statistics`)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    progress = ItemProgress("reference log-probs", len(examples), "examples")
    try:
        for start in range(0, len(examples), batch_size):
            batch = pad_collate(list(examples[start : start + batch_size]), pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items() if k not in REF_KEYS}
            with adapters_off(model) if without_adapters else nullcontext():
                result = sft_forward(model, batch, chunk_size)
            if "position_ids" in batch:
                stats = pair_statistics(result, batch, ld_alpha)
                out.append(torch.stack([stats["chosen_logps"], stats["rejected_logps"]], -1))
            else:
                mask = result["completion"].to(result["logps"].dtype)
                out.append((result["logps"] * mask).sum(-1))
            progress.update(len(batch["input_ids"]))
        progress.finish()
    finally:
        model.train(was_training)
    return torch.cat(out).double().cpu().numpy()


def scored_by_all_ranks(
    score: Any, examples: Sequence[Mapping[str, Any]], accelerator: Any
) -> np.ndarray:
    """``score(examples)`` computed in shares: rank r scores examples r, r+W, ... (every rank
    the same number of forwards, topped up with copies of the first example, since sharded
    forwards are collective), gathered back into the order of ``examples`` on every rank."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return score(examples)
    per_rank = -(-len(examples) // world)
    share = list(examples[rank::world])
    share += [examples[0]] * (per_rank - len(share))
    mine = torch.from_numpy(score(share)).to(accelerator.device)
    gathered = accelerator.gather(mine).cpu().numpy()  # [W·per_rank, ...], rank-major
    order = [r * per_rank + j for j in range(per_rank) for r in range(world)]
    return gathered[order][: len(examples)]


def cache_file(config: Mapping[str, Any], tokenizer: Any) -> Path:
    """Where the precomputed reference log-probs of this data, tokenizer and reference live
    (LD-DPO's ``ld_alpha`` changes the sums, so it is part of the key when set)."""
    ld_alpha = config["trainer"].get("ld_alpha")
    key = config_hash(
        {
            **({"ld_alpha": ld_alpha} if ld_alpha is not None else {}),
            "dataset": config["dataset"],
            "options": vars(tokenize_options(config)),
            "max_prompt_length": config["training_args"].get("max_prompt_length"),
            "chat_template": config["model"].get("chat_template"),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "reference": config["reference"]["model_name_or_path"] or config["model"],
            "peft": config["model_args"] if config["model_args"].get("use_peft") else None,
        },
        ignore_keys=(),
    )
    return Path(config["data"]["cache_dir"]) / "ref-logps" / f"{key}.npz"


@dataclass
class Reference:
    """Where a preference trainer's reference log-probs come from (see the module docs)."""

    mode: str
    precompute: bool = False
    model: torch.nn.Module | None = None
    chunk_size: int = 0
    cache: Path | None = field(default=None)
    ld_alpha: float | None = None

    @classmethod
    def decide(
        cls, loss: Any, rows: Sequence[Mapping[str, Any]], peft: bool, config: Any
    ) -> Reference:
        """The mode for a loss object (``needs_reference``, ``ld_alpha``, ``sync_ref_model``),
        the training rows, whether the policy is a PEFT model, and the typed config
        (``reference``, ``training_args``). Dataset reference columns are full sums of a fixed
        reference: with LD-DPO's ``ld_alpha`` or TR-DPO's ``sync_ref_model`` they are not used
        (the reference is scored instead). TR-DPO needs a live frozen reference model (the
        config schema refuses the other cases; an assertion here)."""
        ld_alpha = loss.ld_alpha
        has_columns = bool(rows) and all(k in row for row in rows for k in REF_KEYS)
        if not loss.needs_reference:
            mode = "none"
        elif has_columns and ld_alpha is None and not loss.sync_ref_model:
            mode = "dataset"
        elif peft and not config.reference.model_name_or_path:
            mode = "peft"
        else:
            mode = "model"
        if has_columns and mode in ("model", "peft"):
            log.warning(
                "The dataset's ref_chosen_logps / ref_rejected_logps are not used: %s",
                "trainer.ld_alpha needs LD-DPO sums"
                if ld_alpha is not None
                else "trainer.sync_ref_model changes the reference during training",
            )
        precompute = config.reference.precompute and mode in ("model", "peft")
        if loss.sync_ref_model and (mode != "model" or precompute):
            raise ConfigError(
                "trainer.sync_ref_model=true needs a frozen reference model scored live "
                f"(reference mode here: {mode}{', precomputed' if precompute else ''})"
            )
        return cls(
            mode, precompute, chunk_size=config.training_args.loss_chunk_size, ld_alpha=ld_alpha
        )

    def describe(self) -> str:
        return self.mode + (" (precomputed once)" if self.precompute else "")

    def load(self, config: Mapping[str, Any], tokenizer: Any) -> Reference:
        """Load the frozen reference model (mode ``model``): ``reference.model_name_or_path``,
        else the policy's initial weights (the same ``model`` config)."""
        from post_training.modeling.loading import load_model

        if self.mode != "model":
            return self
        model_cfg = dict(config["model"])
        key = "model.model_name_or_path"
        if config["reference"]["model_name_or_path"]:
            model_cfg.update(
                model_name_or_path=config["reference"]["model_name_or_path"],
                init_from_config=False,
            )
            key = "reference.model_name_or_path"
        self.model = load_model(model_cfg, tokenizer, key=key).eval().requires_grad_(False)
        return self

    def prepare(self, accelerator: Any) -> None:
        """Place the frozen model like the policy: sharded the same way under ZeRO-3 (a
        DeepSpeed inference engine) and FSDP2 (``fully_shard`` with the launch's plugin), so no
        rank holds a full copy where the policy is sharded; a replica per rank otherwise (DDP,
        ZeRO-1/2 and one process keep whole parameters on every rank for the policy too)."""
        if self.model is None:
            return
        kind = sharding(accelerator)
        if kind == "zero3":
            self.model = zero3_inference_engine(self.model, accelerator)
        elif kind == "fsdp":
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            if not accelerator.is_fsdp2:
                raise ConfigError(
                    "The reference model needs FSDP version 2 (fsdp_config.fsdp_version: 2)"
                )
            self.model = fsdp2_prepare_model(accelerator, self.model)
        else:
            self.model = self.model.to(accelerator.device)
        self.model.eval()  # (a DeepSpeed engine's eval() returns None: no chaining)
        self.model.requires_grad_(False)
        whole, local = parameter_counts(self.model)
        log.info(
            "Reference model: %s, %.2fM of its %.2fM parameters on rank %d",
            {"zero3": "sharded (ZeRO-3)", "fsdp": "sharded (FSDP2)"}.get(
                kind or "", "a replica on every rank"
            ),
            local / 1e6,
            whole / 1e6,
            accelerator.process_index,
        )

    @torch.no_grad()
    def logps(
        self, policy: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Any
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(chosen, rejected)`` summed reference log-probs of a batch [B] each; ``None``
        for a reference-free loss. ``forward(model, batch)`` gives the pair statistics."""
        if self.mode == "none":
            return None
        if self.mode == "dataset" or self.precompute:  # the columns (dataset's or precomputed)
            if not all(k in batch for k in REF_KEYS):
                raise RuntimeError(f"reference mode {self.describe()} but a batch lacks {REF_KEYS}")
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.mode == "model":
            assert self.model is not None, "Reference.load() was not called"
            ref = forward(self.model, batch)
        else:  # peft: the policy without its adapters
            was_training = policy.training
            policy.eval()
            with adapters_off(policy):
                ref = forward(policy, batch)
            policy.train(was_training)
        return ref["chosen_logps"].detach(), ref["rejected_logps"].detach()

    def precompute_columns(
        self,
        policy: torch.nn.Module,
        examples: list[dict[str, Any]],
        config: Mapping[str, Any],
        tokenizer: Any,
        accelerator: Any,
    ) -> None:
        """Set ``ref_chosen_logps`` / ``ref_rejected_logps`` on every pair, from the cache or
        by one pass shared by all ranks (:func:`scored_by_all_ranks`; the main process writes
        the cache atomically), then free the reference model. Call it on every rank."""
        if not self.precompute:
            return
        path = self.cache = cache_file(config, tokenizer)
        values = self._read_cache(path, len(examples))
        missing = torch.tensor(float(values is None), device=accelerator.device)
        if accelerator.num_processes > 1:  # every rank scores, or none: the forward is collective
            missing = accelerator.reduce(missing, "sum")
        if missing.item() > 0:
            scorer = self.model if self.mode == "model" else policy
            values = scored_by_all_ranks(
                lambda share: summed_logps(
                    scorer,
                    share,
                    tokenizer.pad_token_id,
                    int(config["training_args"]["per_device_eval_batch_size"]),
                    self.chunk_size,
                    device=accelerator.device,
                    without_adapters=self.mode == "peft",
                    ld_alpha=self.ld_alpha,
                ),
                examples,
                accelerator,
            )
            if accelerator.is_main_process:
                with atomic_file(path) as tmp:
                    np.savez(tmp, chosen=values[:, 0], rejected=values[:, 1])
                log.info("Reference log-probs of %d pairs written to %s", len(examples), path)
            accelerator.wait_for_everyone()
        for example, (chosen, rejected) in zip(examples, values.tolist(), strict=True):
            example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected
        self.free()

    @staticmethod
    def _read_cache(path: Path, length: int) -> np.ndarray | None:
        if not path.is_file():
            return None
        with np.load(path) as arrays:
            values = np.stack([arrays["chosen"], arrays["rejected"]], -1)
        if len(values) != length:
            log.warning("Reference log-prob cache %s has another length; recomputing", path)
            return None
        log.info("Reference log-probs from the cache %s", path)
        return values

    def free(self) -> None:
        """Drop the reference model (its log-probs are in the batches from now on)."""
        if self.model is not None:
            self.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
