"""Loss functions: pure, tensors in, ``(loss, metrics)`` out; no Trainer, no I/O."""

from post_training.losses.chunked import chunked_logps_and_lse, plain_logps_and_lse
from post_training.losses.irl import irl_loss
from post_training.losses.logprobs import next_token_logps, next_token_logps_and_lse, shift_labels
from post_training.losses.plw import ln_plw_loss, plw_loss
from post_training.losses.sft import sft_loss

__all__ = [
    "chunked_logps_and_lse",
    "irl_loss",
    "ln_plw_loss",
    "next_token_logps",
    "next_token_logps_and_lse",
    "plain_logps_and_lse",
    "plw_loss",
    "sft_loss",
    "shift_labels",
]
