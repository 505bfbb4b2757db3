"""The accelerator of a run, and how the models of a launch are sharded.

``accelerate launch --config_file <ds-zero{1,2,3}|fsdp>.yaml`` selects DeepSpeed or FSDP2
through environment variables. On GPUs accelerate honours them as they are. On CPU ranks it does
not: with ``cpu=True`` it ignores DeepSpeed and FSDP (plain gloo DDP), and without it finds no
process-group backend for the CPU and runs each rank as a world of one. :func:`make_accelerator`
closes that gap so the same launch configs run on CPU ranks (gloo), which is how the test suite
exercises ZeRO-1/2/3 and FSDP2 without a GPU:

* DeepSpeed: the process group is created on ``gloo`` (DeepSpeed 0.19's CPU accelerator falls
  back to it when oneCCL is absent);
* FSDP2: accelerate builds its usual multi-CPU state, which is then switched to FSDP with the
  plugin the launch configured (``fully_shard`` works on CPU tensors over gloo).

:func:`sharding` says how the policy is partitioned, for what must be placed like it (the frozen
reference model).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from post_training.utils.launch_env import launched_with


def make_accelerator(
    gradient_accumulation_steps: int, mixed_precision: str, timeout_s: int = 1800
) -> Accelerator:
    """The run's :class:`Accelerator`: as accelerate builds it on GPUs; on CPU ranks with
    DeepSpeed (gloo) and FSDP2 made to work (module docstring). ``timeout_s``: how long a rank
    waits in a collective (``training_args.ddp_timeout``; torch's default is 10 minutes, which
    a long first tokenization on the main process can exceed)."""
    timeout = timedelta(seconds=timeout_s)
    common: dict[str, Any] = {
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "mixed_precision": mixed_precision,
    }
    if torch.cuda.is_available():
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)], **common)
    if launched_with("deepspeed"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        handler = InitProcessGroupKwargs(backend="gloo", timeout=timeout)
        return Accelerator(kwargs_handlers=[handler], **common)
    handler = InitProcessGroupKwargs(timeout=timeout)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler], **common)  # gloo
    if launched_with("fsdp") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables of the launch
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        # A later AcceleratorState() copies PartialState's fields over its own: both agree.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def sharding(accelerator: Accelerator) -> str | None:
    """``"zero3"`` (DeepSpeed stage 3), ``"fsdp"`` (FSDP, any version) or ``None``: the
    parameters are whole on every rank (DDP, ZeRO-1/2, one process)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return "zero3" if plugin is not None and plugin.zero_stage == 3 else None
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return None


def zero3_inference_engine(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A frozen model partitioned by DeepSpeed ZeRO-3 like the policy (no optimizer): the
    launch's ZeRO and precision settings, without offloading optimizer states it has none of.
    A model loaded under ``zero.Init`` (from pretrained weights with ``zero3_init_flag``) is
    already partitioned; one built whole is partitioned here."""
    import deepspeed

    policy = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = {
        k: v for k, v in policy.get("zero_optimization", {}).items() if k != "offload_optimizer"
    }
    zero["stage"] = 3
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": policy["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
    }
    for precision in ("bf16", "fp16"):
        if precision in policy:
            config[precision] = {"enabled": bool(policy[precision].get("enabled"))}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(whole, on this rank)`` parameter counts of a model that may be sharded: a ZeRO-3
    parameter keeps its full shape in ``ds_numel`` and its partition in ``ds_tensor``; an
    FSDP2 parameter is a DTensor whose local shard is ``to_local()``."""
    whole = local = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):
            whole += param.ds_numel
            local += param.ds_tensor.numel()
        elif hasattr(param, "to_local"):
            whole += param.numel()
            local += param.to_local().numel()
        else:
            whole += param.numel()
            local += param.numel()
    return whole, local


def leave_without_teardown(code: int) -> None:
    """End a rank of a DeepSpeed launch on CPU at once when its run has returned ``code``.

    DeepSpeed 0.19 on CPU ranks (gloo) sometimes aborts in the interpreter's teardown —
    ``terminate called without an active exception`` (a C++ thread destroyed while joinable),
    exit code -6 — after the run has finished, written its outputs and destroyed its process
    group, which turns a completed run into a failed launch. Nothing is left to do but free
    memory, so the logs are flushed and the process ends with ``os._exit``. Other launches
    return normally."""
    if not launched_with("deepspeed") or torch.cuda.is_available():
        return
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
