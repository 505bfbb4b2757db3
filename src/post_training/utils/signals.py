"""Graceful stop on SIGUSR1 / SIGTERM: finish the optimizer step, checkpoint, exit.

SLURM sends ``--signal=B:USR1@<seconds>`` before the wall time (and SIGTERM on preemption);
the trainer checks :attr:`GracefulStop.requested` at each step boundary, saves a checkpoint and
the entrypoint exits with :data:`EXIT_CODE_STOPPED`, so an ``afternotok`` successor resumes it.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)

# Non-zero on purpose: `--dependency=afternotok` starts the pre-submitted successor job.
# 75 is EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
EXIT_CODE_STOPPED = 75

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class GracefulStop:
    """Records a stop request from a signal; installed for the duration of training."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("Received %s: will checkpoint and stop after this step.", self.signal_name)

    def install(self) -> GracefulStop:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
