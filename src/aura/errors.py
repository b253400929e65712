"""Errors the CLI turns into one line on stderr and exit code 2.

Anything raised as an ``AuraError`` is the user's input being wrong (a path, a key, a corrupt
file); every other exception is a bug in Aura and exits 1 with a traceback, except the
``OSError``s that ``environment_error`` recognises: a denied permission, a read-only file system
or a full disk is the state of the user's machine, not a bug, and a traceback would hide the
one fact that matters (which path, which reason).
"""

from __future__ import annotations

import errno


class AuraError(Exception):
    """Bad input: the message is the whole story, shown without a traceback."""


class ConfigError(AuraError):
    """An unknown config key, a value of the wrong type, a missing preset or file."""


class DataError(AuraError):
    """A missing, empty, unreadable or corrupt data source, cache or tokenizer."""


# errno values that describe the user's file system, never Aura's logic. ENOENT is left out on
# purpose: every path a user names is checked for existence with a message of its own, so a
# missing file that gets this far is Aura's mistake, and its traceback is worth having.
ENVIRONMENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM,  # permission denied
    errno.EROFS,  # read-only file system
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG,  # disk full, quota, file too large
    errno.EEXIST, errno.ENOTDIR, errno.EISDIR,  # a file where a directory should be, or back
    errno.ENAMETOOLONG, errno.ELOOP,  # a path the OS cannot resolve
    errno.EIO,  # the device failed
})


def environment_error(exc: BaseException) -> str | None:
    """``PATH: reason`` for an OSError caused by the file system (see ``ENVIRONMENT_ERRNOS``),
    None for any other exception. The reason is the OS's own words, so a permission error
    reads "Permission denied" and a full disk "No space left on device"."""
    if not isinstance(exc, OSError) or exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    return f"{exc.filename}: {reason}"
