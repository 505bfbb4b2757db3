"""Loss functions: pure, tensors in, ``(loss, metrics)`` out; no Trainer, no I/O."""

from post_training.losses.chunked import chunked_logps_and_lse, plain_logps_and_lse
from post_training.losses.dpo import (
    DPO_LOSS_TYPES,
    DPO_LOSSES,
    REFERENCE_FREE,
    check_dpo_options,
    dpo_loss,
)
from post_training.losses.irl import irl_loss
from post_training.losses.logprobs import next_token_logps, next_token_logps_and_lse, shift_labels
from post_training.losses.plw import ln_plw_loss, plw_loss
from post_training.losses.qrpo import (
    check_qrpo_options,
    log_partition,
    qrpo_loss,
    quantile_rewards,
)
from post_training.losses.sft import sft_loss
from post_training.losses.table import (
    COUNT_KEYS,
    PREFERENCE_LOSSES,
    SFT_LOSSES,
    PreferenceLoss,
    SFTLoss,
    build_loss,
    check_columns,
)

__all__ = [
    "COUNT_KEYS",
    "DPO_LOSSES",
    "DPO_LOSS_TYPES",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE",
    "SFT_LOSSES",
    "PreferenceLoss",
    "SFTLoss",
    "build_loss",
    "check_columns",
    "check_dpo_options",
    "check_qrpo_options",
    "chunked_logps_and_lse",
    "dpo_loss",
    "irl_loss",
    "ln_plw_loss",
    "log_partition",
    "next_token_logps",
    "next_token_logps_and_lse",
    "plain_logps_and_lse",
    "plw_loss",
    "qrpo_loss",
    "quantile_rewards",
    "sft_loss",
    "shift_labels",
]
