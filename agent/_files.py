"""Reading an input file without hanging on one that is not a file."""

from __future__ import annotations

import errno
import os
import stat


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``, a regular file. Anything else (a FIFO, a device, a socket) raises OSError with
    the strerror "not a regular file" instead of blocking: open() of a FIFO waits for a writer for good, so a
    config, rules file or profile given as one would hang the agent with no word. A directory raises
    IsADirectoryError, as open() does."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, unread
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)


def check_regular(path: str | os.PathLike[str]) -> None:
    """Raise as :func:`read_regular` would for a path that is not a regular file (readers that open the file
    themselves: Parquet, ONNX Runtime)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the reader says what is wrong in its own words
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
