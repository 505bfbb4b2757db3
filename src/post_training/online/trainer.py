"""The online RL trainer (``train_online``): GRPO and its variants, and RLOO, behind the shared
loop of ``base.Trainer``.

A step's global batch is ``per_device_train_batch_size × accumulation × ranks`` *prompts*; each
micro-batch holds whole groups (its prompts × ``num_generations`` completions), so advantages
never cross a micro-batch or a rank. Per optimizer step, each rank, for each of its
micro-batches:

1. samples ``num_generations`` completions per prompt with the current policy (HF ``generate``;
   completion ``k`` of prompt ``id`` in epoch ``e`` is drawn from the random stream of
   ``(seed, id:e, k)``, :mod:`post_training.data_alignment.generation`, so samples do not depend
   on the batch size, the accumulation or the ranks);
2. scores them with the weighted reward functions / models and computes group advantages
   (:func:`~post_training.losses.online.group_advantages`);
3. scores the sampled tokens without gradient: the sampling policy's log-probs (the ``old``
   policy of the clipped ratio when ``num_iterations > 1``), its entropy, and the reference's
   log-probs when ``beta > 0``.

The loss of the variant (:mod:`post_training.losses.online`) is divided by its normaliser summed
over the accumulation window and all ranks. With ``num_iterations = μ > 1`` one generation batch
serves μ optimizer steps (a cache each rank saves in every checkpoint, so resume is exact).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from post_training.data_alignment.generation import Completion, SamplingOptions, generate_hf
from post_training.data_alignment.rewards import RewardModel, resolve_reward_function
from post_training.data_sft.collate import pad_collate
from post_training.losses.logprobs import next_token_logps_and_lse, shift_labels
from post_training.losses.online import (
    NORMALISERS,
    clipped_policy_loss,
    group_advantages,
    rloo_rewards,
)
from post_training.modeling.loading import is_peft_model, load_model, stop_token_ids
from post_training.trainers.base import Trainer, TrainerContext
from post_training.trainers.reference import adapters_off
from post_training.trainers.sft import model_inputs, sft_forward
from post_training.utils.distributed import sharding
from post_training.utils.launch_env import ONLINE_SAMPLING, refuse_sharded

log = logging.getLogger(__name__)

CACHE_FILE = "generation-cache-rank{rank}.pt"


@dataclass
class RewardSource:
    """One weighted reward: a function ``fn(completion, row)`` or a reward model."""

    name: str
    weight: float
    score: Callable[[Sequence[Mapping[str, Any]], Sequence[str]], list[float]]


def reward_sources(specs: Sequence[Mapping[str, Any]], device: torch.device) -> list[RewardSource]:
    """``trainer.rewards``: each ``{function, module, weight}`` or ``{model: {...}, weight}``."""
    sources = []
    for i, spec in enumerate(specs):
        weight = float(spec.get("weight", 1.0))
        if spec.get("model"):
            model = RewardModel(spec["model"], device)
            name = str(spec.get("name") or f"model{i}")
            sources.append(
                RewardSource(
                    name,
                    weight,
                    lambda rows, texts, m=model: m.score([r["prompt"] for r in rows], texts),
                )
            )
        else:
            fn = resolve_reward_function(str(spec["function"]), spec.get("module"))
            name = str(spec.get("name") or spec["function"]).rsplit(":", 1)[-1]
            sources.append(
                RewardSource(
                    name,
                    weight,
                    lambda rows, texts, f=fn: [
                        float(f(t, r)) for r, t in zip(rows, texts, strict=True)
                    ],
                )
            )
    return sources


def sampled_example(prompt: Sequence[int], completion: Sequence[int]) -> dict[str, np.ndarray]:
    """One sampled sequence as an SFT example: the prompt's ids then the completion's sampled
    ids (its stop token included), only the completion trained on."""
    tokens = np.array([*prompt, *completion], dtype=np.int64)
    mask = np.zeros(len(tokens), dtype=np.int64)
    mask[len(prompt) :] = 1
    return {
        "input_ids": tokens,
        "labels": tokens.copy(),
        "prompt_mask": 1 - mask,
        "completion_mask": mask,
    }


@torch.no_grad()
def sampled_token_stats(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], budget: int = 1 << 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] log-prob of each next token and entropy of the distribution that predicts it,
    aligned like :func:`sft_forward`'s outputs (position t: token t+1; 0 where there is none),
    from one forward; rows go through the model a few at a time, so at most ``budget`` logits
    exist at once."""
    rows, length = batch["input_ids"].shape
    vocab = int(model.get_output_embeddings().weight.shape[0])
    step = max(1, budget // max(length * vocab, 1))
    logps, entropy = [], []
    for start in range(0, rows, step):
        part = {k: v[start : start + step] for k, v in batch.items() if v.ndim == 2}
        logits = model(**model_inputs(part)).logits.float()
        token_logps, lse, _ = next_token_logps_and_lse(logits, part["labels"])
        logps.append(token_logps)
        # H = lse − Σ_v p_v·z_v
        entropy.append(lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1))
    return torch.cat(logps), torch.cat(entropy)


class OnlineTrainer(Trainer):
    """``train_online``: sample, score, and optimise the clipped surrogate of ``trainer``."""

    def __init__(self, ctx: TrainerContext) -> None:
        trainer = ctx.config.trainer
        self.iterations = int(trainer.num_iterations)
        super().__init__(ctx)
        refuse_sharded(ONLINE_SAMPLING, sharding(self.accelerator))  # (checked at launch too)
        self.section = trainer
        self.variant = "rloo" if trainer.name == "rloo" else str(trainer.loss_type)
        self.group = int(trainer.num_generations)
        generation = self.config.generation
        self.sampling = SamplingOptions(
            num_completions=self.group,
            temperature=float(generation.temperature),
            top_p=float(generation.top_p),
            top_k=int(generation.top_k),
            max_new_tokens=int(generation.max_new_tokens),
            seed=int(self.config.seed),
            batch_size=int(generation.batch_size),
            backend="hf",
        )
        self.stops = stop_token_ids(self.run.config["model"], self.tokenizer)
        self.rewards = reward_sources(
            [dict(r) for r in self.run.config["trainer"]["rewards"]], self.accelerator.device
        )
        self.beta = float(trainer.beta)
        self.reference = self._reference() if self.beta else None
        self._cache: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self._timing = {"generation": 0.0, "scoring": 0.0, "window_start": time.perf_counter()}
        self._extremes: dict[str, float] = {}

    # ------------------------------------------------------------------------------ set-up
    def _total_steps(self) -> int:
        """Optimizer steps: each generation batch serves ``num_iterations`` of them."""
        steps = super()._total_steps()
        return steps if self.args.length_key == "max_steps" else steps * self.iterations

    def _reference(self) -> torch.nn.Module | None:
        """The KL reference: the policy without its adapters (PEFT), else a frozen copy of the
        initial policy (``model``)."""
        if is_peft_model(self.accelerator.unwrap_model(self.model)):
            return None
        model = load_model(self.run.config["model"], self.tokenizer)
        return model.to(self.accelerator.device).eval().requires_grad_(False)

    def global_batch_indices(self, step: int) -> list[int]:
        return super().global_batch_indices(step // self.iterations)

    # ------------------------------------------------------------------------------ sampling
    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of step ``step``: sampled and scored at the first step of
        each generation batch, reused for the next ``num_iterations - 1`` steps."""
        cycle = step // self.iterations
        if self._cache is not None and self._cache[0] == cycle:
            return self._cache[1]
        epoch = cycle // self.steps_per_epoch
        batches = [self._sample(prompts, epoch) for prompts in self.micro_batch_indices(step)]
        self._cache = (cycle, batches)
        self._reduce_extremes()
        return batches

    def _sample(self, prompts: list[int], epoch: int) -> dict[str, torch.Tensor]:
        """One micro-batch: the prompts' groups sampled, rewarded and scored."""
        policy = self.accelerator.unwrap_model(self.model)
        started = time.perf_counter()
        prompt_ids = [self.train_data[i]["input_ids"].tolist() for i in prompts]
        ids = [f"{self.train_data[i]['row']['id']}:{epoch}" for i in prompts]
        was_training = policy.training
        completions = generate_hf(
            policy, self.tokenizer, prompt_ids, ids, self.sampling, self.stops
        )
        policy.train(was_training)
        generated = time.perf_counter()
        flat: list[Completion] = [c for group in completions for c in group]
        rows = [self.train_data[i]["row"] for i in prompts for _ in range(self.group)]
        texts = [c.text for c in flat]
        device = self.accelerator.device
        per_source = {
            s.name: torch.tensor(s.score(rows, texts), dtype=torch.float64) for s in self.rewards
        }
        total = sum(s.weight * per_source[s.name] for s in self.rewards)
        examples = [
            sampled_example(p, c.token_ids)
            for p, group in zip(prompt_ids, completions, strict=True)
            for c in group
        ]
        batch = pad_collate(examples, self.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            policy.eval()
            sampling_logps, batch["entropy"] = sampled_token_stats(policy, batch)
            ref = self._reference_logps(policy, batch)
            policy.train(was_training)
        if ref is not None:
            batch["ref_logps"] = ref
        if self.iterations > 1:
            batch["old_logps"] = sampling_logps
        batch["reward"] = total.to(device)
        rewards = batch["reward"]
        if self.variant == "rloo" and ref is not None:
            completion = shift_labels(batch["completion_mask"], 0)
            rewards = rloo_rewards(
                rewards, sampling_logps.double(), ref.double(), completion, self.beta
            )
        batch["advantages"] = group_advantages(
            rewards.double(),
            self.group,
            str(self.section.scale_rewards),
            leave_one_out=self.variant == "rloo",
        )
        for name, values in per_source.items():
            batch[f"reward/{name}"] = values.to(device)
        lengths = torch.tensor([len(c.token_ids) for c in flat], dtype=torch.float64)
        batch["completion_length"] = lengths.to(device)
        batch["truncated"] = torch.tensor([float(c.truncated) for c in flat], device=device)
        self._note_extremes(lengths)
        self._timing["generation"] += generated - started
        self._timing["scoring"] += time.perf_counter() - generated
        return batch

    @torch.no_grad()
    def _reference_logps(
        self, policy: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        if not self.beta:
            return None
        if self.reference is not None:
            return sft_forward(self.reference, batch, self.args.loss_chunk_size)["logps"]
        with adapters_off(policy):  # PEFT: the policy without its adapters
            return sft_forward(policy, batch, self.args.loss_chunk_size)["logps"]

    def _reduce_extremes(self) -> None:
        """The completion length min / max of the logging window over all ranks (here, where
        every rank samples in step; never in the metric summary, which a rank may compute on
        its own, e.g. for an interim progress line)."""
        if self.world == 1 or not self._extremes:
            return
        values = torch.tensor(
            [-self._extremes["min"], self._extremes["max"]],
            device=self.accelerator.device,
            dtype=torch.float64,
        )
        values = self.accelerator.reduce(values, "max")
        self._extremes = {"min": -float(values[0]), "max": float(values[1])}

    def _note_extremes(self, lengths: torch.Tensor) -> None:
        low, high = float(lengths.min()), float(lengths.max())
        self._extremes["min"] = min(self._extremes.get("min", math.inf), low)
        self._extremes["max"] = max(self._extremes.get("max", -math.inf), high)

    # ------------------------------------------------------------------------------ loss
    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        predicted = batch["completion_mask"][:, 1:]  # the tokens some position predicts
        rows = torch.tensor(float(batch["input_ids"].shape[0]), device=predicted.device)
        return {"num_sequences": rows, "num_completion_tokens": predicted.sum().double()}

    def compute_loss(self, model, batch, counts):
        out = sft_forward(model, batch, self.args.loss_chunk_size)
        mask = out["completion"].to(out["logps"].dtype)
        logps = out["logps"]
        old = batch.get("old_logps", logps.detach())
        section = self.section
        terms = clipped_policy_loss(
            self.variant,
            logps,
            old,
            batch["advantages"],
            mask,
            epsilon_low=float(section.epsilon),
            epsilon_high=float(section.epsilon_high or section.epsilon),
            beta=0.0 if self.variant == "rloo" else self.beta,
            ref_logps=batch.get("ref_logps"),
            max_completion_length=int(self.config.generation.max_new_tokens),
        )
        normaliser = counts[NORMALISERS[self.variant]].clamp(min=1)
        loss = terms.loss_sum / normaliser
        sequence_level = terms.ratio.shape[-1] == 1
        weight = torch.ones_like(mask[:, :1]) if sequence_level else mask
        sums = {
            "reward_sum": batch["reward"].sum(),
            "reward_sq_sum": (batch["reward"] ** 2).sum(),
            "advantage_sum": batch["advantages"].sum(),
            "advantage_sq_sum": (batch["advantages"] ** 2).sum(),
            "completion_length_sum": batch["completion_length"].sum(),
            "truncated_sum": batch["truncated"].sum(),
            "entropy_sum": (batch["entropy"] * mask).sum(),
            "clip_low_sum": (terms.low_clipped.to(mask.dtype) * weight).sum(),
            "clip_high_sum": (terms.high_clipped.to(mask.dtype) * weight).sum(),
            "clip_weight": weight.sum(),
        }
        for source in self.rewards:
            values = batch[f"reward/{source.name}"]
            sums[f"rewards/{source.name}_sum"] = values.sum()
            sums[f"rewards/{source.name}_sq_sum"] = (values**2).sum()
        if terms.kl is not None:
            sums["kl_sum"] = (terms.kl * mask).sum()
        elif "ref_logps" in batch:  # RLOO: the sampled sequences' log-ratio to the reference
            sums["kl_sum"] = ((logps.detach() - batch["ref_logps"]) * mask).sum()
        return loss, {k: v.detach().double() for k, v in sums.items()}

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        n = max(counts.get("num_sequences", 0.0), 1.0)
        tokens = max(counts.get("num_completion_tokens", 0.0), 1.0)

        def mean_std(prefix: str) -> tuple[float, float]:
            mean = sums.get(f"{prefix}_sum", 0.0) / n
            var = max(sums.get(f"{prefix}_sq_sum", 0.0) / n - mean * mean, 0.0)
            return mean, math.sqrt(var * n / (n - 1)) if n > 1 else 0.0

        out: dict[str, float] = {}
        out["reward"], out["reward_std"] = mean_std("reward")
        for source in self.rewards:
            mean, std = mean_std(f"rewards/{source.name}")
            out[f"rewards/{source.name}/mean"], out[f"rewards/{source.name}/std"] = mean, std
        out["advantages/mean"], out["advantages/std"] = mean_std("advantage")
        out["completions/mean_length"] = sums.get("completion_length_sum", 0.0) / n
        out["completions/truncated_ratio"] = sums.get("truncated_sum", 0.0) / n
        out["entropy"] = sums.get("entropy_sum", 0.0) / tokens
        weight = max(sums.get("clip_weight", 0.0), 1.0)
        out["clip_ratio/low_mean"] = sums.get("clip_low_sum", 0.0) / weight
        out["clip_ratio/high_mean"] = sums.get("clip_high_sum", 0.0) / weight
        if "kl_sum" in sums:
            out["kl"] = sums["kl_sum"] / tokens
        out.update(self._window_extremes_and_time())
        return out

    def _window_extremes_and_time(self) -> dict[str, float]:
        """Completion length min / max over the ranks (:meth:`_reduce_extremes`) and the share of
        the window's time spent generating, scoring and training (this rank's clock)."""
        low = self._extremes.get("min", math.nan)
        high = self._extremes.get("max", math.nan)
        now = time.perf_counter()
        elapsed = max(now - self._timing["window_start"], 1e-9)
        generation, scoring = self._timing["generation"], self._timing["scoring"]
        self._timing = {"generation": 0.0, "scoring": 0.0, "window_start": now}
        self._extremes = {}
        return {
            "completions/min_length": low,
            "completions/max_length": high,
            "time/generation_share": generation / elapsed,
            "time/scoring_share": scoring / elapsed,
            "time/training_share": max(1.0 - (generation + scoring) / elapsed, 0.0),
        }

    # ------------------------------------------------------------------------------ evaluation
    def evaluate_loss(self) -> dict[str, float]:
        """Held-out exact match of greedy generations (main process) on ``evaluation.dataset``."""
        from post_training.exact_match import generation_accuracy

        if not self.accelerator.is_main_process:
            return {}
        evaluation = self.run.config["evaluation"]
        result = generation_accuracy(
            self.accelerator.unwrap_model(self.model),
            self.tokenizer,
            list(self.eval_data),
            dict(evaluation["dataset"]),
            max_new_tokens=int(evaluation["max_new_tokens"]),
            batch_size=int(evaluation["batch_size"]),
        )
        metrics = {"eval_exact_match": result["accuracy"]}
        metrics.update({f"eval_exact_match/{k}": v for k, v in result["per_task"].items()})
        return metrics

    # ------------------------------------------------------------------------------ checkpoints
    def save_extra_state(self, directory: Path) -> None:
        """Each rank's generation batch when it serves more steps (``num_iterations > 1``)."""
        if self.iterations > 1 and self._cache is not None:
            cycle, batches = self._cache
            cpu = [{k: v.cpu() for k, v in b.items()} for b in batches]
            torch.save(
                {"cycle": cycle, "batches": cpu},
                directory / CACHE_FILE.format(rank=self.accelerator.process_index),
            )

    def load_extra_state(self, directory: Path, step: int) -> str | None:
        if self.iterations == 1:
            return None
        path = directory / CACHE_FILE.format(rank=self.accelerator.process_index)
        if not path.is_file():  # at a generation boundary the next step samples anew
            return None if step % self.iterations == 0 else f"{path.name} is missing"
        saved = torch.load(path, weights_only=True)
        device = self.accelerator.device
        self._cache = (
            int(saved["cycle"]),
            [{k: v.to(device) for k, v in b.items()} for b in saved["batches"]],
        )
        return None
