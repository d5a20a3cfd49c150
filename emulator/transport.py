"""Sealed transport of offsite-tuning folders (a bundle or an adapter, see `emulator/bundle.py`).

To travel, a folder is zipped (stored, fixed timestamps) and sealed with `privacy.security.seal`: signed by the sender
(Ed25519) and, given a recipient, encrypted to them (X25519 + AES-256-GCM). `open_sealed_dir` refuses anything that is
unsigned, tampered, signed by someone else, addressed to someone else, of the wrong kind, or whose files do not match
their manifest hashes, with a `BundleError` that says which.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from emulator.bundle import MANIFEST, BundleError, safe_relpath, verify_dir
from privacy.security.seal import Identity, PublicIdentity, SealError, open_sealed, seal

_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def pack(folder: str | Path, fmt: str) -> bytes:
    """Zip a verified folder: the manifest and exactly the files it lists."""
    folder = Path(folder)
    manifest = verify_dir(folder, fmt)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in [MANIFEST, *sorted(manifest["files"])]:
            z.writestr(zipfile.ZipInfo(name, _ZIP_TIME), (folder / name).read_bytes())
    return buf.getvalue()


def unpack(blob: bytes, folder: str | Path, fmt: str) -> dict:
    """Unzip what `pack` made into `folder`, writing only files the manifest lists, then verify them."""
    folder = Path(folder)
    try:
        z = zipfile.ZipFile(io.BytesIO(blob))
        manifest = json.loads(z.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise BundleError(f"not a packed Tandem folder: {e}") from None
    if manifest.get("format") != fmt:
        raise BundleError(f"this is a {manifest.get('format')!r}, expected a {fmt!r}")
    listed = {safe_relpath(n) for n in manifest.get("files", {})}
    if set(z.namelist()) != listed | {MANIFEST}:
        raise BundleError("packed files do not match the manifest's list")
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(listed):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(z.read(name))
    (folder / MANIFEST).write_bytes(z.read(MANIFEST))
    return verify_dir(folder, fmt)


def seal_dir(folder: str | Path, out: str | Path, fmt: str, signer: Identity,
             recipient: PublicIdentity | None = None) -> Path:
    """Pack `folder`, sign it as `signer` and (given `recipient`) encrypt it to them; write the blob to `out`."""
    out = Path(out)
    meta = {"format": fmt, "from": signer.name, "to": recipient.name if recipient else None}
    blob = seal(pack(folder, fmt), signer.sign_key, recipient.box_pub if recipient else None, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(blob)
    tmp.replace(out)
    return out


def open_sealed_dir(sealed: str | Path, into: str | Path, fmt: str, sender: PublicIdentity,
                    me: Identity | None = None) -> dict:
    """Verify `sealed` came from `sender` (and is for `me`, if encrypted), unpack it into `into`, check every hash."""
    path = Path(sealed)
    if not path.is_file():
        raise BundleError(f"no sealed file at {path}")
    try:
        payload, meta = open_sealed(path.read_bytes(), sender.verify_key, me.box_key if me else None)
    except SealError as e:
        raise BundleError(f"refusing {path.name}: {e} (expected from {sender.name!r}"
                          f"{f' to {me.name!r}' if me else ''})") from None
    if meta.get("format") != fmt:
        raise BundleError(f"refusing {path.name}: it is a {meta.get('format')!r}, expected a {fmt!r}")
    return unpack(payload, into, fmt)
