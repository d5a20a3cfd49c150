"""Files written whole or not at all: `write_atomic` (any file) and `write_private` (mode 0600: keys, tokens, runs).

`write_atomic(path, data, mode)` / `atomic_writer(path, mode)`: the bytes go to a temporary file in the same folder
(created 0600, then given `mode`), are fsynced, renamed over `path` with os.replace, and the folder is fsynced, so
readers (and a crash at any point) see the old file or the new one, never half of one, and `path` ends up with exactly
`mode` whatever the old file's was or the umask says. A failure removes the temporary file and leaves `path` as it was.

`write_private(path, data, overwrite=...)`: mode 0600 (readable by the owner only).
`overwrite=False` (a key that cannot be replaced, e.g. a signing identity): the file is created with O_EXCL, so an
existing file, or one another process creates at the same moment, raises FileExistsError and is left untouched.
`overwrite=True` (e.g. a certificate's key, remade with its certificate): `write_atomic(path, data, 0o600)`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def private_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _fsync_dir(folder: Path) -> None:
    """Make a rename (or a new file) in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write; on a clean exit it replaces `path` atomically with mode `mode` (module docstring)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically (temp file, fsync, rename, fsync of the folder), with mode `mode`."""
    with atomic_writer(path, mode) as f:
        f.write(data)


def write_private(path: str | Path, data: bytes, *, overwrite: bool) -> None:
    """Write `data` to `path` with mode 0600; see the module docstring for what `overwrite` does."""
    path = Path(path)
    if overwrite:
        write_atomic(path, data, 0o600)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # ours (O_EXCL): a half-written key is worse than none
        raise
    _fsync_dir(path.parent)


def write_private_key(path: str | Path, key, *, overwrite: bool) -> None:
    """Write a private key as unencrypted PKCS#8 PEM with `write_private`."""
    write_private(path, private_pem(key), overwrite=overwrite)


__all__ = ["atomic_writer", "private_pem", "write_atomic", "write_private", "write_private_key"]
