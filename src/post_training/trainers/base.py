"""The training loop shared by every trainer; subclasses only say how a batch becomes a loss.

One optimizer step consumes one *global batch* of ``per_device_batch × accumulation × ranks``
examples, taken in order from a per-epoch permutation seeded by ``seed + epoch``. The data order is
therefore a pure function of the step number, which makes resuming exact: a checkpoint at step
``s`` restores model, optimizer, scheduler and RNG states, and training continues with global
batch ``s``. Losses are normalised by the number of loss tokens in the whole accumulation window
on all ranks (counted before the first forward), so k accumulated micro-batches equal one batch.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from post_training.data_sft.collate import pad_collate
from post_training.data_sft.sampling import epoch_batches
from post_training.errors import ConfigError, StorageFull
from post_training.modeling.compile import compile_decoder
from post_training.modeling.loading import is_peft_model, merged_from_adapter
from post_training.utils import checkpointing as ckpt
from post_training.utils import run_status
from post_training.utils.atomic import atomic_dir
from post_training.utils.distributed import sharding
from post_training.utils.failpoints import failpoint
from post_training.utils.flops import ModelFlops, device_peak_flops
from post_training.utils.progress import TrainProgress, silence_known_warnings
from post_training.utils.run import RunContext
from post_training.utils.signals import GracefulStop
from post_training.utils.tracking import MetricsLogger

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FINAL_MODEL_DIR = "final-model"
FINAL_ADAPTER_DIR = "final-adapter"


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on GPU; max resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def without_tied_copies(model: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the second name of a tied parameter (``lm_head.weight`` of a
    model with tied embeddings). A state dict gathered from shards (FSDP2, DeepSpeed) holds
    both names as separate tensors, which ``save_pretrained`` would write twice."""
    seen: set[int] = set()
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            copies.add(name)
        seen.add(id(param))
    return {k: v for k, v in state_dict.items() if k not in copies}


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    global_step: int = 0
    total_steps: int = 0
    tokens_seen: int = 0  # non-padding input tokens, all ranks
    loss_tokens_seen: int = 0
    samples_seen: int = 0


class TrainerCallback:
    """Step hooks: override what you need. Called on the main loop of every rank."""

    def on_step_begin(self, trainer: Trainer) -> None:
        """Before optimizer step ``trainer.state.global_step + 1`` (its batches not yet built)."""

    def on_step_end(self, trainer: Trainer, step: dict[str, float]) -> None:
        """After optimizer step ``trainer.state.global_step``; ``step`` holds what it did, over
        all ranks: ``tokens`` (non-padding), ``flops`` (model FLOPs), ``examples``,
        ``grad_norm``, ``learning_rate``."""

    def on_log(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        """After a training or evaluation log at ``step``."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After a full checkpoint was completed at ``path``."""


@dataclass
class TrainerContext:
    """Everything a trainer is built from: the run frame assembles it once."""

    config: Any  # the typed config (post_training.schema: TrainSFT / TrainPreference)
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train_data: Sequence[Mapping[str, Sequence[int]]]
    eval_data: Sequence[Mapping[str, Sequence[int]]]
    accelerator: Accelerator
    run: RunContext
    metrics: MetricsLogger
    loss: Any  # a loss object of post_training.losses.table
    reference: Any = None  # post_training.trainers.reference.Reference (preference only)
    callbacks: list[TrainerCallback] = field(default_factory=list)


@dataclass(frozen=True)
class TrainOutcome:
    state: TrainState
    stopped_by_signal: bool
    final_model_dir: Path | None
    last_checkpoint: Path | None


class Trainer(ABC):
    """Owns the loop, checkpoints, logging and graceful stop. Subclasses implement the loss."""

    def __init__(self, ctx: TrainerContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.args = ctx.config.training_args
        self.tokenizer = ctx.tokenizer
        self.train_data = ctx.train_data
        self.eval_data = ctx.eval_data
        self.accelerator = accelerator = ctx.accelerator
        self.run = ctx.run
        self.metrics = ctx.metrics
        self.loss = ctx.loss
        self.callbacks = list(ctx.callbacks)
        self.state = TrainState()
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        model = ctx.model

        self.micro_batch = self.args.per_device_train_batch_size
        self.accumulation = self.args.gradient_accumulation_steps
        self.world = accelerator.num_processes
        self.resumed_from: Path | None = None  # the checkpoint `train` resumed from
        self.global_batch = self.micro_batch * self.accumulation * self.world
        self.steps_per_epoch = len(self.train_data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"The training split has {len(self.train_data)} examples, fewer than one global "
                f"batch ({self.global_batch} = per-device batch × accumulation × {self.world} "
                "ranks)"
            )
        self.state.total_steps = self._total_steps()
        self.eval_strategy = self.args.eval_strategy

        # MFU: training FLOPs per token of this model against the device's peak FLOP/s.
        self.model_flops = ModelFlops.of(model)
        self.peak_flops = device_peak_flops(accelerator.device)
        if self.args.gradient_checkpointing:
            # transformers 5 renamed it; the old name still works there, with a warning.
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        if self.args.torch_compile:
            compile_decoder(model)
        self._configure_deepspeed()
        optimizer = self._make_optimizer(model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = self._make_scheduler(self.optimizer)
        accelerator.register_for_checkpointing(self.scheduler)

    # ----------------------------------------------------------------------------- subclass API
    @abstractmethod
    def loss_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This micro-batch's share of the loss normalisers (token / sequence counts).

        The loop sums them over the accumulation window and all ranks before any forward, and
        hands the totals to :meth:`compute_loss`.
        """

    @abstractmethod
    def compute_loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        counts: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch, normalised by the window totals ``counts``.

        Returns the loss and metric *sums* over the micro-batch (summed further over the window
        and ranks, then turned into logged values by :meth:`summarize`).
        """

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Logged metrics from summed metrics and counts (default: none beyond the loss)."""
        return {}

    def save_extra_state(self, directory: Path) -> None:
        """Per-rank state of the trainer beyond accelerate's, written into the checkpoint being
        saved on every rank (default: none)."""
        return None

    def load_extra_state(self, directory: Path, step: int) -> str | None:
        """Restore :meth:`save_extra_state` from the checkpoint of ``step``; a problem (one
        line) or None."""
        return None

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch of a micro-batch's examples (default: one per row, right-padded)."""
        return pad_collate(examples, self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------ set-up
    def _total_steps(self) -> int:
        key = self.args.length_key
        value = getattr(self.args, key)
        if key == "max_steps":
            return int(value)
        if key == "num_train_epochs":
            return math.ceil(float(value) * self.steps_per_epoch)
        if key == "num_training_tokens":  # packed: a step holds global_batch × mean bin length
            mean_bin = sum(len(e["input_ids"]) for e in self.train_data) / len(self.train_data)
            return math.ceil(int(value) / (self.global_batch * mean_bin))
        return math.ceil(int(value) / self.global_batch)  # num_training_samples

    def _configure_deepspeed(self) -> None:
        """Fill the DeepSpeed values that accelerate would otherwise take from a dataloader.

        We never hand dataloaders to ``accelerate.prepare`` (the data order is ours), so the
        micro-batch size must be set explicitly; clipping must follow ``max_grad_norm`` rather
        than accelerate's default of 1.0.
        """
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.micro_batch
        ds["gradient_accumulation_steps"] = self.accumulation
        ds["train_batch_size"] = self.global_batch
        ds["gradient_clipping"] = float(self.args.max_grad_norm or 0.0)

    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            fused=self.accelerator.device.type == "cuda",
        )

    def _make_scheduler(self, optimizer: torch.optim.Optimizer):
        warmup = self.args.warmup_steps
        if warmup is None:
            warmup = math.ceil(self.args.warmup_ratio * self.state.total_steps)
        return get_scheduler(
            self.args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=int(warmup),
            num_training_steps=self.state.total_steps,
        )

    # ------------------------------------------------------------------------------ data order
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch (cached: one epoch is in use at a time)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            lengths = [len(e["input_ids"]) for e in self.train_data]
            batches = epoch_batches(
                lengths,
                self.global_batch,
                self.config.seed,
                epoch,
                self.args.group_by_length,
            )
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def global_batch_indices(self, step: int) -> list[int]:
        """Example indices of the global batch used at optimizer step ``step`` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        return self.epoch_batches(epoch)[offset]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of step ``step``: micro-batch m of rank r is slot m·W + r.

        The global batch is sorted by length before it is cut into slots, so each micro-batch
        pads to a tighter length and ranks get similar loads. The step's loss and gradient are
        unchanged: they are sums over the whole global batch divided by window-wide counts.
        """
        batches = []
        for indices in self.micro_batch_indices(step):
            batch = self.collate([self.train_data[i] for i in indices])
            batches.append({k: v.to(self.accelerator.device) for k, v in batch.items()})
        return batches

    def micro_batch_indices(self, step: int) -> list[list[int]]:
        """The example indices of this rank's micro-batches of step ``step`` (see
        :meth:`micro_batches`: the global batch sorted by length, slot m·W + r)."""
        indices = sorted(
            self.global_batch_indices(step), key=lambda i: len(self.train_data[i]["input_ids"])
        )
        rank, size = self.accelerator.process_index, self.micro_batch
        slots = [m * self.world + rank for m in range(self.accumulation)]
        return [indices[slot * size : (slot + 1) * size] for slot in slots]

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(self.accelerator.device, torch.float64)
        return self.accelerator.reduce(value, "sum") if self.world > 1 else value

    # ------------------------------------------------------------------------------ loop
    def train(self) -> TrainOutcome:
        self.resumed_from = self._resume()
        stopper = GracefulStop().install()
        silence_known_warnings()
        progress = TrainProgress(
            self.state.total_steps,
            self.state.global_step,
            enabled=self.accelerator.is_main_process,
        )
        try:
            with progress.shown():
                return self._train_loop(stopper, progress)
        finally:
            stopper.uninstall()

    def _train_loop(self, stopper: GracefulStop, progress: TrainProgress) -> TrainOutcome:
        args, state = self.args, self.state
        log.info(
            "Training %d steps from step %d: %d examples, global batch %d "
            "(%d per device × %d accumulation × %d ranks), %d steps per epoch",
            state.total_steps,
            state.global_step,
            len(self.train_data),
            self.global_batch,
            self.micro_batch,
            self.accumulation,
            self.world,
            self.steps_per_epoch,
        )
        self.model.train()
        window = self._new_window()
        last_saved: Path | None = self.resumed_from  # a finished job re-run saves nothing new
        evaluated_at = -1
        stopped = False
        while state.global_step < state.total_steps:
            for callback in self.callbacks:
                callback.on_step_begin(self)
            before = (window["tokens"], window["flops"])
            grad_norm, lr = self._optimizer_step(window)
            state.global_step += 1
            step = state.global_step
            stop_now = self._stop_requested(stopper)
            done = {
                "tokens": window["tokens"] - before[0],
                "flops": window["flops"] - before[1],
                "examples": float(self.global_batch),
                "grad_norm": grad_norm,
                "learning_rate": lr,
            }
            for callback in self.callbacks:
                callback.on_step_end(self, done)
            progress.step(step)
            if step % args.logging_steps == 0 or step == state.total_steps or stop_now:
                progress.train(step, self._log_train(window, grad_norm, lr))
            elif progress.interim_due():  # logging steps far apart: the window so far
                progress.train(step, self._window_metrics(window, grad_norm, lr), interim=True)
            if self._eval_due(step):
                progress.eval(step, self._log_eval(step))
                evaluated_at = step
            every = args.inference_checkpoint_steps
            if every and step % every == 0:
                self.save_model(self.run.checkpoint_dir / f"inference-checkpoint-{step}")
            if (args.save_steps and step % args.save_steps == 0) or stop_now:
                last_saved = self.save_checkpoint()
            if stop_now:
                stopped = True
                log.warning(
                    "Stopped by %s at step %d; checkpoint %s",
                    stopper.signal_name or "a signal on another rank",
                    step,
                    last_saved,
                )
                break

        if stopped:
            return TrainOutcome(state, True, None, last_saved)
        if last_saved is None or ckpt.step_of(last_saved) != state.global_step:
            last_saved = self.save_checkpoint()
        if self.eval_data and self.eval_strategy != "no" and evaluated_at != state.global_step:
            progress.eval(state.global_step, self._log_eval(state.global_step))
        final = self.run.checkpoint_dir / FINAL_MODEL_DIR
        if is_peft_model(self.accelerator.unwrap_model(self.model)):
            self.save_model(self.run.checkpoint_dir / FINAL_ADAPTER_DIR)
            if self.config.model_args.save_merged_model:
                self.save_merged_model(final)
            else:
                final = self.run.checkpoint_dir / FINAL_ADAPTER_DIR
        else:
            self.save_model(final)
        if self.accelerator.is_main_process:
            print(f"Final model: {final}", flush=True)
        return TrainOutcome(state, False, final, last_saved)

    def _sum_dict_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        if not values:
            return {}
        keys = sorted(values)
        totals = self._sum_over_ranks(torch.stack([values[k].double().reshape(()) for k in keys]))
        return dict(zip(keys, totals.tolist(), strict=True))

    def _window_counts(
        self, batches: list[dict[str, torch.Tensor]], weights: list[float] | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalisers summed over the micro-batches (times their weight) and all ranks."""
        local: dict[str, torch.Tensor] = {}
        for batch, weight in zip(batches, weights or [1.0] * len(batches), strict=True):
            for key, value in self.loss_counts(batch).items():
                local[key] = local.get(key, 0) + weight * value.double()
        counts = self._sum_dict_over_ranks(local)
        return {k: torch.tensor(v, device=self.accelerator.device) for k, v in counts.items()}

    def _optimizer_step(self, window: dict[str, Any]) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches; updates the logging window."""
        accelerator, state = self.accelerator, self.state
        batches = self.micro_batches(state.global_step)
        counts = self._window_counts(batches)
        # DDP averages gradients over ranks: scale by W so the result is the window's loss.
        scale = float(self.world)
        sums: dict[str, torch.Tensor] = {
            "loss": torch.zeros((), dtype=torch.float64, device=accelerator.device),
            "tokens": torch.zeros((), dtype=torch.float64, device=accelerator.device),
            "flops": torch.zeros((), dtype=torch.float64, device=accelerator.device),
        }
        for batch in batches:
            with accelerator.accumulate(self.model):
                loss, metrics = self.compute_loss(self.model, batch, counts)
                # accelerate divides by the accumulation steps; our loss is already normalised.
                accelerator.backward(loss * scale * self.accumulation)
            sums["loss"] += loss.detach().double()
            tokens = batch["attention_mask"].sum().double()
            sums["tokens"] += tokens
            # Attention ran over the padded (or packed) row length.
            sums["flops"] += tokens * self.model_flops.per_token(batch["input_ids"].shape[1])
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.detach().double()
        max_norm = self.args.max_grad_norm
        grad_norm = accelerator.clip_grad_norm_(
            self.model.parameters(), float(max_norm) if max_norm else float("inf")
        )
        if grad_norm is None:  # DeepSpeed clips inside its engine and reports the norm there
            grad_norm = float("nan")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        totals = self._sum_dict_over_ranks(sums)
        state.tokens_seen += int(totals["tokens"])
        state.samples_seen += self.global_batch
        window["steps"] += 1
        window["tokens"] += totals.pop("tokens")
        window["flops"] += totals.pop("flops")
        for key, value in totals.items():
            window["sums"][key] = window["sums"].get(key, 0.0) + value
        for key, value in counts.items():
            window["counts"][key] = window["counts"].get(key, 0.0) + float(value)
        return float(grad_norm), float(lr)

    def _eval_due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (1-based); training always ends
        with an evaluation unless the strategy is ``no``."""
        if not self.eval_data or self.eval_strategy == "no":
            return False
        if self.eval_strategy == "epoch":
            return step % self.steps_per_epoch == 0
        every = self.args.eval_steps
        return bool(every) and step % int(every) == 0

    def _stop_requested(self, stopper: GracefulStop) -> bool:
        flag = torch.tensor(float(stopper.requested), device=self.accelerator.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "max")
        return bool(flag.item())

    @staticmethod
    def _new_window() -> dict[str, Any]:
        return {
            "steps": 0,
            "tokens": 0.0,
            "flops": 0.0,
            "sums": {},
            "counts": {},
            "start": time.perf_counter(),
        }

    def _log_train(self, window: dict[str, Any], grad_norm: float, lr: float) -> dict[str, float]:
        """Log the metrics of the window since the last log, start a new window; the metrics."""
        metrics = self._window_metrics(window, grad_norm, lr)
        self.log(metrics, self.state.global_step)
        window.update(self._new_window())
        return metrics

    def _log_eval(self, step: int) -> dict[str, float]:
        metrics = self.evaluate_loss()
        self.log(metrics, step)
        return metrics

    def _window_metrics(
        self, window: dict[str, Any], grad_norm: float, lr: float
    ) -> dict[str, float]:
        """The training metrics of the steps in ``window`` (last step's grad norm and lr)."""
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        step = self.state.global_step
        sums, counts = window["sums"], window["counts"]
        metrics = {
            "loss": sums["loss"] / max(window["steps"], 1),
            **self.summarize(sums, counts),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "epoch": step / self.steps_per_epoch,
            "num_tokens": self.state.tokens_seen,
            "num_samples": self.state.samples_seen,
            "tokens_per_second": window["tokens"] / elapsed,
        }
        flops_per_device = window["flops"] / elapsed / self.world
        metrics["perf/tflops"] = flops_per_device / 1e12
        metrics["perf/mfu"] = flops_per_device / self.peak_flops
        metrics["peak_memory_gb"] = peak_memory_gb(self.accelerator.device)
        return metrics

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step`` (metrics.jsonl, trackers, the run's status.json) and
        tell the callbacks."""
        self.metrics.log(metrics, step)
        if self.accelerator.is_main_process:
            run_status.update(last_step=step)
        for callback in self.callbacks:
            callback.on_log(self, metrics, step)

    def _eval_batches(self) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """This rank's eval batches: examples r, r+W, ...; every rank gets the same number of
        batches (an exhausted rank scores a stand-in batch flagged False), since DDP, FSDP and
        ZeRO-3 forwards are collective."""
        size = self.args.per_device_eval_batch_size
        mine = self.eval_data[self.accelerator.process_index :: self.world]
        num_batches = math.ceil(math.ceil(len(self.eval_data) / self.world) / size)
        batches = []
        for i in range(num_batches):
            examples = mine[i * size : (i + 1) * size]
            batch = self.collate(examples or self.eval_data[:1])
            batches.append(
                ({k: v.to(self.accelerator.device) for k, v in batch.items()}, bool(examples))
            )
        return batches

    @torch.no_grad()
    def evaluate_loss(self) -> dict[str, float]:
        """Loss over the whole eval split as one batch (same normalisation as training)."""
        self.model.eval()
        batches = self._eval_batches()
        counts = self._window_counts([b for b, _ in batches], [float(r) for _, r in batches])
        sums: dict[str, torch.Tensor] = {}
        for batch, real in batches:
            loss, metrics = self.compute_loss(self.model, batch, counts)
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0) + float(real) * value.detach().double()
        totals = self._sum_dict_over_ranks(sums)
        self.model.train()
        floats = {k: float(v) for k, v in counts.items()}
        return {
            f"eval_{k}": v
            for k, v in {"loss": totals["loss"], **self.summarize(totals, floats)}.items()
        }

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Full resumable checkpoint, written under a temporary name and renamed when complete.
        A full disk stops the run with one line (:class:`StorageFull`, exit 74): the partial
        save stays a temporary (removed by the next save), the earlier checkpoints are intact."""
        root = self.run.checkpoint_dir
        final = ckpt.checkpoint_path(root, self.state.global_step)
        tmp = ckpt.temporary_path(final)
        try:
            self._write_checkpoint(root, tmp, final)
        except Exception as error:
            if not ckpt.is_disk_full(error, root):
                raise
            previous = ckpt.latest_checkpoint(root)
            raise StorageFull(
                f"{root}: the disk is full (or its quota): checkpoint {final.name} was not "
                f"saved ({type(error).__name__}: {str(error).splitlines()[0][:200]}); the "
                f"partial save stays as {tmp.name}, "
                + (f"{previous.name} is intact" if previous else "no earlier checkpoint")
                + ". Free space and re-run the same command to resume."
            ) from error
        log.info("Saved checkpoint %s", final)
        for callback in self.callbacks:
            callback.on_save(self, final)
        return final

    def _write_checkpoint(self, root: Path, tmp: Path, final: Path) -> None:
        if self.accelerator.is_main_process:
            ckpt.remove_stale_temporaries(root)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.save_extra_state(tmp)
        failpoint("checkpoint-saved-state", self.state.global_step)
        if self.accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ckpt.write_manifest(tmp, self.run.config["resuming"].get("verify", "sha256"))
            failpoint("checkpoint-before-publish", self.state.global_step)
            ckpt.finalize(tmp, final)
            ckpt.rotate(root, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> Path | None:
        """Load the newest verified checkpoint that loads on every rank (None: a fresh start).
        One that fails to load is named in a warning, moved aside and the previous one is
        tried, so that a damaged newest checkpoint costs the steps since the one before it,
        never the run."""
        problems = []
        for path in self.run.resume_candidates:
            problem = self._load_checkpoint(path)
            failed = torch.tensor(float(problem is not None), device=self.accelerator.device)
            if self.world > 1:
                failed = self.accelerator.reduce(failed, "sum")
            if failed.item() == 0:
                return path
            problem = problem or "failed to load on another rank"
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                aside = ckpt.move_aside(path)
                log.warning("Checkpoint %s: %s; moved aside to %s", path, problem, aside.name)
            problems.append(f"  {path}: {problem}")
            self.accelerator.wait_for_everyone()
        if problems:
            raise ConfigError(
                f"Refusing to resume: no checkpoint in {self.run.checkpoint_dir} loads:\n"
                + "\n".join(problems)
                + "\nThey were moved aside; a re-run with resuming.fresh_start_if_damaged=true "
                "trains from scratch."
            )
        return None

    def _load_checkpoint(self, path: Path) -> str | None:
        """Restore model, optimizer, scheduler, RNG states and counters from ``path``; what went
        wrong (one line naming the file), or None. A plan of another length is a config error."""
        rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        if not rng.is_file():  # accelerate would resume silently without it
            return f"{rng.name} is missing (the RNG state of rank {self.accelerator.process_index})"
        try:
            saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            state = TrainState(**saved)
        except (OSError, ValueError, TypeError) as error:
            return f"{STATE_FILE} is unreadable ({type(error).__name__}: {error})"
        if state.total_steps != self.state.total_steps:
            raise ConfigError(
                f"{path}: checkpoint planned {state.total_steps} steps, this config plans "
                f"{self.state.total_steps}; the data order would not match"
            )
        try:
            self.accelerator.load_state(str(path))
        except Exception as error:  # a damaged file: fall back to the previous checkpoint
            first = str(error).splitlines()[0] if str(error) else ""
            return f"failed to load ({type(error).__name__}: {first})"
        problem = self.load_extra_state(path, state.global_step)
        if problem is not None:
            return problem
        self.state = state
        log.info("Resumed at step %d from %s", self.state.global_step, path)
        return None

    def save_merged_model(self, directory: Path) -> None:
        """LoRA merged into the base weights: a plain checkpoint (end of training only, since
        merging rewrites the model in place). A quantized (QLoRA) or sharded (ZeRO-3, FSDP2)
        policy is merged from the saved adapter into a whole full-precision base instead."""
        if self.accelerator.is_main_process:
            peft_model = self.accelerator.unwrap_model(self.model)
            if getattr(peft_model, "is_loaded_in_4bit", False) or sharding(self.accelerator):
                adapter = self.run.checkpoint_dir / FINAL_ADAPTER_DIR
                task = peft_model.peft_config["default"].task_type
                merged = merged_from_adapter(
                    self.config.model.model_dump(),
                    str(adapter),
                    self.tokenizer,
                    reward_head=task == "SEQ_CLS",  # a str enum (TaskType) or a str
                )
            else:
                merged = peft_model.merge_and_unload()
            with atomic_dir(directory, unique=False, fsync=True) as tmp:
                merged.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        self.accelerator.wait_for_everyone()

    def save_model(self, directory: Path) -> None:
        """Inference checkpoint: safetensors weights (LoRA: the adapter), config, tokenizer and
        chat template."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(self.model)
            state_dict = without_tied_copies(unwrapped, state_dict)
            try:
                with atomic_dir(directory, unique=False, fsync=True) as tmp:
                    unwrapped.save_pretrained(tmp, state_dict=state_dict)
                    self.tokenizer.save_pretrained(tmp)
                    if directory.name == FINAL_MODEL_DIR:
                        failpoint("final-model-written", self.state.global_step)
            except Exception as error:
                if not ckpt.is_disk_full(error, directory.parent):
                    raise
                raise StorageFull(
                    f"{directory.parent}: the disk is full (or its quota): {directory.name} was "
                    f"not saved ({type(error).__name__}); the checkpoints are intact. Free space "
                    "and re-run the same command: it resumes and writes it."
                ) from error
        self.accelerator.wait_for_everyone()
