"""Typed errors for user mistakes. Each message is one line that names the bad value and the fix.

The CLI turns any :class:`SGRSError` into ``error: <message>`` on stderr and exit code 2,
with no traceback; the napari plugin shows the same message as a notification.
"""

from __future__ import annotations


class SGRSError(Exception):
    """Base class of every error caused by the user's input or environment."""

    def __init__(self, message: str):
        # Keep the message on one line: it is shown in a terminal and a notification.
        super().__init__(" ".join(str(message).split()))


class InputError(SGRSError, ValueError):
    """A file, folder or value the user gave is unusable (unreadable, wrong shape, bad values)."""


class ConfigError(SGRSError, ValueError):
    """A setting is invalid (patch size, device, method ...)."""


class CheckpointError(SGRSError):
    """A checkpoint or run folder is missing, corrupt, or unsafe to load."""


class ResourceError(SGRSError):
    """Not enough memory or disk for the requested job, or the output is not writable."""


class TrainingDiverged(SGRSError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class LockedError(ConfigError):
    """A folder is in use by another sgrs process (its lock is held); ``holder`` says by whom."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


def os_reason(exc: OSError) -> str:
    """A few words for why a file operation failed, for a one-line message."""
    import errno

    return {errno.ENOSPC: "the disk is full", errno.EROFS: "the disk is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EDQUOT: "the disk quota is exceeded"}.get(exc.errno, exc.strerror or str(exc))


class InputWarning(UserWarning):
    """An input that is used, but not quite as given (e.g. NaN voxels ignored): one line naming
    the file. The CLI prints it as ``warning: <message>``."""
