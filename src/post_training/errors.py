"""The project's own errors: a problem in the user's input or config, not a bug.

Each deserves one clear line that names what to fix, not a traceback. This module is a leaf: it
imports nothing from the project, so any module may raise these.
"""

from __future__ import annotations


class ProjectError(Exception):
    """An error in the user's input or config that deserves one clear line, not a traceback."""


class ConfigError(ProjectError, ValueError):
    """A configuration that cannot run; raised before anything is trained or written."""


class DataError(ProjectError, ValueError):
    """Bad input data; the message names the file, the row and the field."""


class SubmitError(ProjectError, ValueError):
    """A sweep that cannot be turned into submit lines; raised before anything is written."""


class StorageFull(ProjectError, OSError):
    """The filesystem of an output filled up (or its quota did) during a write; nothing already
    complete was touched. Exit code 74 (``EX_IOERR``)."""

    exit_code = 74
