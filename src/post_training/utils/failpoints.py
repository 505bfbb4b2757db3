"""Named points where a test can kill the process, to prove that a kill there loses nothing.

``POST_TRAINING_FAILPOINT=<name>[@<step>]`` makes :func:`failpoint` send SIGKILL to its own
process when the run reaches that point (at that optimizer step, if given): the same as a kill -9
or a node failure at exactly that moment, without racing a polling test against the save. Unset
(always, outside the fault-injection tests), a failpoint is one dictionary lookup.

Points: ``checkpoint-saved-state`` (the model, optimizer, scheduler and RNG files of a checkpoint
are written, its trainer state and manifest not), ``checkpoint-before-publish`` (complete, not
yet renamed), ``final-model-written`` (the final model's files are written, not yet renamed),
``partition-rows-written`` (an alignment partition's rows are written, its manifest not).
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "POST_TRAINING_FAILPOINT"
POINTS = (
    "checkpoint-saved-state",
    "checkpoint-before-publish",
    "final-model-written",
    "partition-rows-written",
)


def failpoint(name: str, step: int | None = None) -> None:
    """SIGKILL this process when ``$POST_TRAINING_FAILPOINT`` names this point (and step)."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return
    point, _, at = wanted.partition("@")
    if point != name or (at and step is not None and int(at) != step):
        return
    os.kill(os.getpid(), signal.SIGKILL)
