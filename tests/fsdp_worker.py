"""One rank of the FSDP2 check of the chunked LM head (run by ``test_lm_head.py`` under
``torch.distributed.run``, gloo on CPU).

The tiny model is sharded with ``fully_shard`` (each decoder layer, then the root, which holds
the embeddings and the LM head), as accelerate's FSDP2 plugin does. Each rank takes half of a
fixed batch, computes the SFT loss through the chunked head, normalised by the token count of
the whole batch, and runs backward. Rank 0 writes the loss sum and the full (unsharded) gradients,
summed over ranks, for the test to compare with a single-process full-logit computation.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.fsdp_worker OUT.pt CHUNK
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from post_training.trainers.lm_head import chunkable_head
from post_training.trainers.sft import sft_forward

from .test_lm_head import batch, tiny_model


def main(out_path: str, chunk_size: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = tiny_model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert chunkable_head(model) is not None, "the chunked path must apply under FSDP2"

    full = batch()
    rows = full["input_ids"].shape[0]
    mine = list(range(rank, rows, world))
    local = {k: v[mine] for k, v in full.items()}
    total_tokens = float(full["completion_mask"][:, 1:].sum())
    for _ in range(2):  # twice: the second step runs on re-sharded parameters
        model.zero_grad()
        out = sft_forward(model, local, chunk_size)
        loss = -(out["logps"] * out["completion"]).sum() / total_tokens
        loss.backward()
    # FSDP2 averages gradients over ranks; the window loss is their sum.
    grads = {
        name: param.grad.full_tensor() * world
        for name, param in model.named_parameters()
        if param.grad is not None
    }
    loss_sum = loss.detach().clone()
    dist.all_reduce(loss_sum)
    if rank == 0:
        torch.save({"loss": loss_sum, "grads": grads}, out_path)
    # Both ranks leave together: a rank tearing gloo down while its peer still works aborts
    # ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    # The work is done and written. Skip the interpreter's C++ teardown: with gloo and FSDP2 on
    # CPU (torch 2.13) it aborts about one run in thirty after a clean destroy_process_group
    # ("terminate called without an active exception" on a rank that has already printed its
    # last line), which would fail the run for nothing the test checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
