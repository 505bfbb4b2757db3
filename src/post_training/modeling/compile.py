"""``training_args.torch_compile``: the transformer body compiled in place with ``torch.compile``.

What is compiled is the decoder stack (embeddings, layers, final norm: nearly all of a step's
FLOPs), with ``dynamic=True`` so rows of a new length (packing, length-sorted micro-batches) reuse
the graph instead of recompiling each step. The LM head stays eager: the chunked head
(:mod:`post_training.trainers.lm_head`) swaps its forward per batch, which a compiled graph would
see as a new function every step. ``nn.Module.compile`` compiles in place, so parameter names,
state dicts, checkpoints and PEFT adapters are unchanged; the DDP / FSDP2 / DeepSpeed wrappers go
around the module as usual. On CPU inductor generates C++ (a compiler is needed: gcc here); the
first step pays for the compilation (tens of seconds for the tiny model on 2 cores).
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM or sequence classifier, through PEFT's wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, "base_model", None)
    if not isinstance(decoder, nn.Module) or decoder is base:
        raise TypeError(f"{type(base).__name__}: no transformer body to compile")
    return decoder


def compile_decoder(model: nn.Module) -> nn.Module:
    """Compile ``model``'s transformer body in place (dynamic shapes); the compiled module."""
    decoder = decoder_of(model)
    decoder.compile(dynamic=True)
    log.info("torch.compile: %s (dynamic shapes; the first step compiles)", type(decoder).__name__)
    return decoder
