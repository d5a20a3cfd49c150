"""Private key files: unencrypted PKCS#8 PEM, mode 0600 (readable by the owner only), never left half-written.

`overwrite=False` (a key that cannot be replaced, e.g. a signing identity): the file is created with O_EXCL, so an
existing file, or one another process creates at the same moment, raises FileExistsError and is left untouched.
`overwrite=True` (e.g. a certificate's key, remade with its certificate): the key goes to a 0600 temporary file in
the same folder, is fsynced and renamed over `path`, so readers see the old key or the new one, and the mode is
0600 whatever the old file's was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_fd(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_private(path: str | Path, data: bytes, *, overwrite: bool) -> None:
    """Write `data` to `path` with mode 0600; see the module docstring for what `overwrite` does."""
    path = Path(path)
    if not overwrite:
        _write_fd(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), data)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: mode 0600
    try:
        _write_fd(fd, data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_private_key(path: str | Path, key, *, overwrite: bool) -> None:
    """Write a private key as unencrypted PKCS#8 PEM with `write_private`."""
    write_private(path, private_pem(key), overwrite=overwrite)


__all__ = ["private_pem", "write_private", "write_private_key"]
