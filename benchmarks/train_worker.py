"""One measured training run, ours or TRL's, in a process of its own (its own peak memory).

    python -m benchmarks.train_worker SPEC.json RESULT.json

``SPEC.json`` (written by :mod:`benchmarks.run`) names the implementation (``ours``, ``trl``, or
``plain``: our loop with the plain Hugging Face loss on full logits, see :class:`HFLossTrainer`),
the kind (``sft`` / ``dpo``), the reference mode of DPO (``live`` / ``precomputed``), the model
directory (config + tokenizer; weights are initialised from seed 0 in both, as our
``init_from_config`` does), the JSON-lines data, and the shared settings: max length, batch,
steps, warm-up steps, precision, attention implementation, learning rate.

What is measured, identically for both: a timestamp at the end of every optimizer step (ours:
a ``TrainerCallback.on_step_end`` of our loop; TRL: its ``on_step_end`` callback), with the running
totals of non-pad input tokens, examples (packed rows for SFT, pairs for DPO) and model FLOPs
(``post_training.utils.flops``, per micro-batch: tokens × FLOPs per token at the row length the
attention ran over). Throughput is over the steps after the warm-up ones, from the end of the
last warm-up step to the end of the last step, so model loading, data preparation, reference
precomputation and the final save are outside it. Peak memory: the process's ``VmHWM`` (peak RSS)
on CPU, ``torch.cuda.max_memory_allocated`` on GPU, over the whole process; ``step_memory_gb``
is the peak during the training steps minus the memory in use just before the first one
(``VmRSS``; CUDA allocated): what the steps themselves add on top of the loaded model and data.
For it the peak is reset before the first step (``/proc/self/clear_refs``;
``torch.cuda.reset_peak_memory_stats``), after saving the peak so far.

Threads: ``torch.set_num_threads(spec["threads"])`` before anything else (the parent also sets
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the environment); the thread count torch reports
during the steps is recorded (``torch_threads``), with the CPU seconds of the timed window
(``cpu_utilisation`` = CPU s per wall s: about the thread count when the process had its cores).
The worker's own start-up matmul peak is recorded as ``peak_flops``; MFU is left to the parent,
which divides by the best of all peak measurements at this thread count.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from post_training.utils.flops import ModelFlops, device_peak_flops


class Marks:
    """Running totals at the end of each optimizer step."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.examples = 0.0
        self.flops = 0.0
        self.start = time.perf_counter()
        self.rows: list[tuple[float, float, float, float]] = []
        self.cpu: list[float] = []  # process CPU time (all threads) at each step end
        self.before_training_gb: float | None = None
        self.peak_before_training_gb = 0.0

    def training_starts(self) -> None:
        """Called before every step; before the first, records the memory in use and the peak
        so far, then resets the peak."""
        if self.before_training_gb is not None:
            return
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.peak_before_training_gb = peak_memory_gb(device)
        self.before_training_gb = memory_in_use_gb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)

    def step_end(self) -> None:
        self.rows.append((time.perf_counter(), self.tokens, self.examples, self.flops))
        self.cpu.append(time.process_time())


def status_gb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in GiB; None if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20  # kB
    return None


def memory_in_use_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    return status_gb("VmRSS") or 0.0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = status_gb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The benchmark model, initialised exactly as our ``load_model`` does from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec["model_dir"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(
            config,
            dtype=torch.bfloat16 if spec["precision"] == "bf16" else torch.float32,
            attn_implementation=spec["attn_implementation"],
        )


# ------------------------------------------------------------------------------------- ours
def ours_overrides(spec: dict[str, Any]) -> list[str]:
    special = spec["special_tokens"]
    transform = "messages" if spec["kind"] == "sft" else "preference"
    overrides = [
        "wandb.mode=disabled",
        "tensorboard=false",
        f"seed={spec['seed']}",
        f"job_subdir=bench-{spec['kind']}-{os.getpid()}",
        f"model.model_name_or_path={spec['model_dir']}",
        "model.init_from_config=true",
        "model.init_seed=0",
        "model.chat_template=chatml",
        f"model.max_seq_length={spec['max_length']}",
        f"model.torch_dtype={'bfloat16' if spec['precision'] == 'bf16' else 'float32'}",
        f"model.attn_implementation={spec['attn_implementation']}",
        "model.special_tokens.bos_token=null",
        "model.special_tokens.bos_token_id=null",
        f"model.special_tokens.eos_token='{special['eos']}'",
        "model.special_tokens.eos_token_id=null",
        f"model.special_tokens.pad_token='{special['pad']}'",
        "model.special_tokens.pad_token_id=null",
        "model.special_tokens.add_bos=false",
        f"dataset.train={{path: '{spec['data_path']}', transform: {transform}}}",
        "dataset.eval=null",
        "data.truncation=truncate",
        "training_args.num_train_epochs=null",
        f"training_args.max_steps={spec['steps']}",
        f"training_args.per_device_train_batch_size={spec['batch_size']}",
        "training_args.gradient_accumulation_steps=1",
        f"training_args.learning_rate={spec['learning_rate']}",
        "training_args.lr_scheduler_type=constant",
        "training_args.warmup_steps=0",
        "training_args.adam_beta2=0.999",
        f"training_args.logging_steps={spec['steps']}",
        "training_args.eval_steps=null",
        "training_args.save_steps=null",
        f"training_args.loss_chunk_size={spec['loss_chunk_size']}",
        f"training_args.mixed_precision={'bf16' if spec['precision'] == 'bf16' else 'no'}",
        "evaluation.at_end=false",
    ]
    if spec["impl"] == "compiled":
        overrides.append("training_args.torch_compile=true")
    # SFT packs documents; DPO packs several pairs per row, except in the "unpacked" arm.
    overrides.append(f"training_args.packing={str(spec['impl'] != 'unpacked').lower()}")
    if spec["kind"] != "sft":
        overrides.append(f"reference.precompute={str(spec['ref'] == 'precomputed').lower()}")
    return overrides


def hf_loss_trainer() -> type:
    """Our SFT trainer with the loss the way a plain Hugging Face loop computes it:
    ``model(..., labels=...).loss``, i.e. full-vocabulary logits [B, T, V] and the library's
    cross-entropy (mean over completion tokens: equal to ours with one micro-batch on one
    rank). Everything else (data, packing, loop, optimizer) is ours, so only the loss differs."""
    from post_training.trainers.sft import SFTTrainer, model_inputs

    class HFLossTrainer(SFTTrainer):
        def compute_loss(self, model, batch, counts):
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            return model(**model_inputs(batch), labels=labels).loss, {}

        def summarize(self, sums, counts):
            return {}

    return HFLossTrainer


def step_timer(marks: Marks) -> Any:
    """The measurement hook: a trainer callback at every optimizer step (the loop unchanged)."""
    from post_training.trainers.base import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, trainer):
            marks.training_starts()

        def on_step_end(self, trainer, step):
            marks.tokens += step["tokens"]
            marks.flops += step["flops"]
            marks.examples += int(step["examples"])
            marks.threads = torch.get_num_threads()
            marks.step_end()

    return StepTimer()


def run_plain_sft(cfg: Any) -> int:
    """``train_sft`` with the plain-loss trainer: the same frame, data, loop and optimizer."""
    from post_training.data_sft.training_data import load_sft_data
    from post_training.frame import begin, finish, load_policy
    from post_training.losses.table import build_loss

    frame = begin(cfg)
    data = load_sft_data(frame.config, frame.tokenizer, packing=frame.args.training_args.packing)
    model = load_policy(frame)
    loss = build_loss(frame.args.trainer)
    return finish(
        frame, hf_loss_trainer(), model, data.train, data.eval, loss=loss, evaluation_dataset=None
    )


def run_ours(spec: dict[str, Any], marks: Marks) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from post_training import frame
    from post_training.utils.config import CONFIGS_DIR

    frame.EXTRA_CALLBACKS.append(step_timer(marks))
    entrypoint = "train_sft" if spec["kind"] == "sft" else "train_preference"
    config_name = "train-sft" if spec["kind"] == "sft" else "train-preference"
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=ours_overrides(spec))
    OmegaConf.set_struct(cfg, True)
    if spec["impl"] == "plain":
        code = run_plain_sft(cfg)
    else:
        code = __import__(f"post_training.{entrypoint}", fromlist=["run"]).run(cfg)
    if code:
        raise SystemExit(f"our {entrypoint} exited {code}")
    return {}


# ------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict[str, Any], marks: Marks) -> dict[str, Any]:
    import datasets
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    from benchmarks.data_prep import generation_tagged_jinja
    from post_training.data_sft.templates import TEMPLATES

    datasets.disable_caching()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["model_dir"])
    tokenizer.eos_token = spec["special_tokens"]["eos"]
    tokenizer.pad_token = spec["special_tokens"]["pad"]
    rows = [json.loads(line) for line in Path(spec["data_path"]).read_text().splitlines()]
    model = load_model(spec)
    model_flops = ModelFlops.of(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.threads = torch.get_num_threads()
            marks.step_end()

    def count(inputs: dict[str, torch.Tensor], pairs: bool) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        tokens = float(mask.sum()) if mask is not None else float(ids.numel())  # padding-free
        marks.tokens += tokens
        marks.flops += tokens * model_flops.per_token(ids.shape[1])
        marks.examples += ids.shape[0] / 2 if pairs else ids.shape[0]

    common = {
        "output_dir": tempfile.mkdtemp(prefix="trl-bench-"),
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["learning_rate"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": spec["steps"],
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "bf16": spec["precision"] == "bf16",
        "gradient_checkpointing": False,  # TRL's default is True; ours is false
        "use_cpu": device.type == "cpu",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": spec["seed"],
        "max_length": spec["max_length"],
    }
    if spec["kind"] == "sft":
        from trl import SFTConfig, SFTTrainer

        tokenizer.chat_template = generation_tagged_jinja(
            TEMPLATES["chatml"].bind(None, tokenizer.eos_token)
        )

        class Timed(SFTTrainer):
            def training_step(self, model, inputs, *args, **kwargs):
                marks.training_starts()
                count(inputs, pairs=False)
                return super().training_step(model, inputs, *args, **kwargs)

        args = SFTConfig(**common, packing=True, packing_strategy="bfd", assistant_only_loss=True)
        dataset = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
        trainer = Timed(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
    else:
        from trl import DPOConfig, DPOTrainer

        class Timed(DPOTrainer):
            def training_step(self, model, inputs, *args, **kwargs):
                marks.training_starts()
                count(inputs, pairs=True)
                return super().training_step(model, inputs, *args, **kwargs)

        precompute = spec["ref"] == "precomputed"
        args = DPOConfig(**common, precompute_ref_log_probs=precompute, beta=0.1)
        dataset = datasets.Dataset.from_list(rows)
        trainer = Timed(
            model=model,
            # Live: a frozen copy of the initial policy, as ours loads; precomputed: TRL
            # scores the data with the (initial) policy before training and keeps no copy.
            ref_model=None if precompute else load_model(spec),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
    trainer.train()
    return {"trl_packed_rows": len(trainer.train_dataset)} if spec["kind"] == "sft" else {}


def summarize(spec: dict[str, Any], marks: Marks, device: torch.device) -> dict[str, Any]:
    warmup = spec["warmup"]
    if len(marks.rows) < warmup + 1 or len(marks.rows) != spec["steps"]:
        raise RuntimeError(f"{len(marks.rows)} step marks, expected {spec['steps']}")
    t0, tok0, ex0, fl0 = marks.rows[warmup - 1] if warmup else (marks.start, 0.0, 0.0, 0.0)
    t1, tok1, ex1, fl1 = marks.rows[-1]
    seconds = t1 - t0
    peak = device_peak_flops(device)
    flops_per_s = (fl1 - fl0) / seconds
    step_times = [b[0] - a[0] for a, b in zip(marks.rows, marks.rows[1:], strict=False)]
    cpu_s = marks.cpu[-1] - (marks.cpu[warmup - 1] if warmup else 0.0)
    return {
        "timed_steps": spec["steps"] - warmup,
        "timed_s": seconds,
        "tokens_per_s": (tok1 - tok0) / seconds,
        "examples_per_s": (ex1 - ex0) / seconds,
        "tokens_per_step": (tok1 - tok0) / (spec["steps"] - warmup),
        "step_times_s": [round(t, 4) for t in step_times],
        # CPU seconds per wall second in the timed window: ~the thread count when the
        # process had the cores to itself, less when other processes took them.
        "cpu_utilisation": cpu_s / seconds,
        # Less sensitive to other processes on a shared machine than tokens per wall second.
        "tokens_per_cpu_s": (tok1 - tok0) / cpu_s,
        "tflops": flops_per_s / 1e12,
        "peak_flops": peak,  # this process's start-up measurement (CPU) or rated peak (GPU)
        "peak_memory_gb": max(peak_memory_gb(device), marks.peak_before_training_gb),
        "step_memory_gb": peak_memory_gb(device) - (marks.before_training_gb or 0.0),
    }


def main(argv: list[str] | None = None) -> None:
    spec_path, out_path = (sys.argv[1:] if argv is None else argv)[:2]
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    marks = Marks()
    device_peak_flops(device)  # measured (CPU) before any training, in both
    extra = (run_trl if spec["impl"] == "trl" else run_ours)(spec, marks)
    result = {**summarize(spec, marks, device), **extra}
    result["process_s"] = time.perf_counter() - marks.start
    result["torch_threads"] = getattr(marks, "threads", torch.get_num_threads())
    result["threads_requested"] = spec.get("threads")
    result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
