"""Small files (keys, certificates, cached state): atomic, durable writes with an exact mode, and reads that
check the open file itself."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    # A rename (or link) is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all_synced(fd: int, data: bytes) -> None:
    """Write all of ``data`` (``os.write`` may write less) and fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old file or the new one, never a torn or too-open one:
    a temporary file next to it (O_EXCL, O_NOFOLLOW, exactly ``mode`` whatever the umask), fsync, rename,
    fsync of the directory (created 0700 if missing).

    Without ``overwrite`` an existing file is never replaced, even by a racing writer (the temporary file is
    linked, not renamed): ``FileExistsError``. Errors are ``OSError``s, for the caller to word.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # open()'s mode is filtered by the umask
            write_all_synced(fd, data)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class FileShapeError(ValueError):
    """The path is not a small regular file."""


class NotRegularFileError(FileShapeError):
    pass


class FileTooLargeError(FileShapeError):
    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def read_regular_file(path: Path, max_size: int) -> tuple[bytes, int]:
    """The bytes and permission bits of a regular file of at most ``max_size`` bytes, both taken from the open
    file so it cannot be swapped between the check and the read. Raises ``NotRegularFileError``,
    ``FileTooLargeError`` or the ``OSError`` of the open or read, for the caller to word."""
    # O_NONBLOCK: a FIFO at the path must produce an error, not hang the caller.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(str(path))
        if st.st_size > max_size:
            raise FileTooLargeError(st.st_size)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)
