"""Loss functions: pure, tensors in, ``(loss, metrics)`` out; no Trainer, no I/O."""

from post_training.losses.logprobs import next_token_logps, shift_labels
from post_training.losses.sft import sft_loss

__all__ = ["next_token_logps", "sft_loss", "shift_labels"]
