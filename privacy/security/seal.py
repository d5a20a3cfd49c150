"""Sign and encrypt blobs (offsite-tuning bundles, adapters) so that their origin and integrity can be checked.

Every blob is signed with Ed25519 by its sender. It may also be encrypted for one recipient: the sender makes a fresh
(ephemeral) X25519 key, agrees a secret with the recipient's X25519 public key, derives an AES-256 key from it with
HKDF-SHA256 and encrypts with AES-256-GCM. The order is sign-then-encrypt, so the signature is hidden too.

The signature covers the payload, the `meta` dict and the recipient's public key: a recipient who decrypts a blob
cannot re-encrypt it to someone else under the original sender's name (the re-addressed blob no longer verifies).

Envelope (version 1), all of it covered by the signature or the GCM tag, so flipping any byte is detected:

    b"TNDMSEAL"  8 bytes magic
    version      1 byte (= 1)
    header_len   4 bytes, big-endian
    header       canonical JSON (sorted keys, no spaces, ASCII):
                 {"enc": null | "x25519-hkdf-sha256-aes256gcm", "epk": hex | null, "meta": {...},
                  "nonce": hex | null, "recipient": hex | null, "sig": "ed25519"}
    body         signed only: signature (64) || payload
                 encrypted:   AES-GCM(signature || payload), with the 13+header_len bytes above as associated data

Every failure to open raises `SealError` saying what was wrong; nothing else escapes `open_sealed`.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.security.files import write_private_key

MAGIC = b"TNDMSEAL"
VERSION = 1
SIG_ALG = "ed25519"
ENC_ALG = "x25519-hkdf-sha256-aes256gcm"
SIG_BYTES = 64
_PREFIX = struct.Struct(">8sBI")  # magic, version, header length
_DOMAIN = b"tandem-seal/v1"  # separates these signatures and keys from any other use of the same keys
_MAX_HEADER = 1 << 20


class SealError(Exception):
    """A blob could not be opened: not ours, unsigned, tampered, wrong signer or wrong recipient."""


# ----------------------------------------------------------------------------------------------------------- keys

@dataclass
class Identity:
    """A party's private keys: `sign_key` signs what it sends, `box_key` opens what is encrypted to it."""
    name: str
    sign_key: Ed25519PrivateKey
    box_key: X25519PrivateKey

    def public(self) -> "PublicIdentity":
        return PublicIdentity(self.name, self.sign_key.public_key(), self.box_key.public_key())


@dataclass
class PublicIdentity:
    """What others know of a party: `verify_key` checks its signatures, `box_pub` encrypts to it."""
    name: str
    verify_key: Ed25519PublicKey
    box_pub: X25519PublicKey


def _key_paths(directory: str | Path, name: str) -> dict[str, Path]:
    d = Path(directory)
    return {s: d / f"{name}.{s}" for s in ("sign.key", "sign.pub", "box.key", "box.pub")}


def _write_public(path: Path, key) -> None:
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def generate_identity(directory: str | Path, name: str) -> Identity:
    """Make and write `name.sign.key/.pub` (Ed25519) and `name.box.key/.pub` (X25519) as PEM; private keys 0600.

    Refuses to overwrite an existing identity: losing a private key cannot be undone."""
    paths = _key_paths(directory, name)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(f"identity {name!r} already exists ({', '.join(existing)}); delete it first")
    Path(directory).mkdir(parents=True, exist_ok=True)
    ident = Identity(name, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())
    write_private_key(paths["sign.key"], ident.sign_key, overwrite=False)  # O_EXCL: never replace a private key
    write_private_key(paths["box.key"], ident.box_key, overwrite=False)
    _write_public(paths["sign.pub"], ident.sign_key.public_key())
    _write_public(paths["box.pub"], ident.box_key.public_key())
    return ident


def _load(path: Path, loader, kind: type):
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: create it with privacy.security.seal.generate_identity")
    key = loader(path.read_bytes(), **({"password": None} if loader is serialization.load_pem_private_key else {}))
    if not isinstance(key, kind):
        raise ValueError(f"{path} holds a {type(key).__name__}, expected {kind.__name__}")
    return key


def load_identity(directory: str | Path, name: str) -> Identity:
    """Read a party's private keys written by `generate_identity`."""
    p = _key_paths(directory, name)
    return Identity(name, _load(p["sign.key"], serialization.load_pem_private_key, Ed25519PrivateKey),
                    _load(p["box.key"], serialization.load_pem_private_key, X25519PrivateKey))


def load_public(directory: str | Path, name: str) -> PublicIdentity:
    """Read a party's public keys (the `.pub` files, which can be handed out freely)."""
    p = _key_paths(directory, name)
    return PublicIdentity(name, _load(p["sign.pub"], serialization.load_pem_public_key, Ed25519PublicKey),
                          _load(p["box.pub"], serialization.load_pem_public_key, X25519PublicKey))


def _raw(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------------------------ envelope

def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _to_be_signed(payload: bytes, recipient_hex: str | None, meta: dict) -> bytes:
    """What the Ed25519 signature covers: domain, recipient and meta (length-prefixed canonical JSON), payload."""
    bound = _canonical({"meta": meta, "recipient": recipient_hex})
    return _DOMAIN + struct.pack(">Q", len(bound)) + bound + payload


def _aes_key(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    """AES-256 key from the X25519 secret, bound to both public keys of the exchange."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=_DOMAIN + epk + recipient).derive(shared)


def _head(header: dict) -> bytes:
    """Magic, version, length and canonical header: the start of a blob, and the AES-GCM associated data."""
    h = _canonical(header)
    return _PREFIX.pack(MAGIC, VERSION, len(h)) + h


def seal(payload: bytes, signer: Ed25519PrivateKey, recipient: X25519PublicKey | None = None,
         meta: dict | None = None) -> bytes:
    """Sign `payload` (with `meta` and the recipient bound in) and, given a `recipient`, encrypt it to them."""
    meta = dict(meta or {})
    _canonical(meta)  # fail here, at the sender, if meta is not plain JSON
    recipient_raw = _raw(recipient) if recipient is not None else None
    recipient_hex = recipient_raw.hex() if recipient_raw is not None else None
    signature = signer.sign(_to_be_signed(payload, recipient_hex, meta))
    header = {"enc": None, "epk": None, "meta": meta, "nonce": None, "recipient": recipient_hex, "sig": SIG_ALG}
    if recipient is None:
        return _head(header) + signature + payload
    eph = X25519PrivateKey.generate()
    epk, nonce = _raw(eph.public_key()), os.urandom(12)
    header.update(enc=ENC_ALG, epk=epk.hex(), nonce=nonce.hex())
    head = _head(header)
    key = _aes_key(eph.exchange(recipient), epk, recipient_raw)
    return head + AESGCM(key).encrypt(nonce, signature + payload, head)


def _hex_field(header: dict, name: str, size: int) -> bytes:
    value = header.get(name)
    if not isinstance(value, str) or len(value) != 2 * size or any(c not in "0123456789abcdef" for c in value):
        raise SealError(f"malformed header: {name!r} must be {size} bytes of lowercase hex")
    return bytes.fromhex(value)


def _parse(blob: bytes) -> tuple[dict, bytes, bytes]:
    """Split a blob into (header, associated data, body), refusing anything not exactly in canonical form."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SealError(f"not a Tandem sealed blob (got {type(blob).__name__}, expected bytes)")
    blob = bytes(blob)
    if len(blob) < _PREFIX.size or blob[:len(MAGIC)] != MAGIC:
        raise SealError("not a Tandem sealed blob (bad magic)")
    _, version, n = _PREFIX.unpack_from(blob)
    if version != VERSION:
        raise SealError(f"unsupported sealed blob version {version} (this code reads version {VERSION})")
    if n > _MAX_HEADER or _PREFIX.size + n > len(blob):
        raise SealError("malformed sealed blob: header length runs past the end (truncated or tampered)")
    raw = blob[_PREFIX.size:_PREFIX.size + n]
    try:
        header = json.loads(raw.decode("ascii"))
        canonical = isinstance(header, dict) and _canonical(header) == raw
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SealError(f"malformed header: {e}") from None
    if not canonical or set(header) != {"enc", "epk", "meta", "nonce", "recipient", "sig"} \
            or not isinstance(header["meta"], dict):
        raise SealError("malformed header: not the canonical version-1 header (tampered)")
    return header, blob[:_PREFIX.size + n], blob[_PREFIX.size + n:]


def open_sealed(blob: bytes, verify_key: Ed25519PublicKey,
                recipient_key: X25519PrivateKey | None = None) -> tuple[bytes, dict]:
    """Check and open a sealed blob; return (payload, meta). Raises `SealError` naming what was wrong."""
    if not isinstance(verify_key, Ed25519PublicKey):
        raise TypeError(f"verify_key must be an Ed25519PublicKey, got {type(verify_key).__name__}")
    if recipient_key is not None and not isinstance(recipient_key, X25519PrivateKey):
        raise TypeError(f"recipient_key must be an X25519PrivateKey, got {type(recipient_key).__name__}")
    header, head, body = _parse(blob)
    if header["sig"] is None:
        raise SealError("unsigned: the blob carries no signature")
    if header["sig"] != SIG_ALG:
        raise SealError(f"unsupported signature algorithm {header['sig']!r}")
    if header["enc"] is None:
        if any(header[f] is not None for f in ("epk", "nonce", "recipient")):
            raise SealError("malformed header: recipient or key material on an unencrypted blob (tampered)")
        plain = body
    elif header["enc"] == ENC_ALG:
        if recipient_key is None:
            raise SealError("encrypted but no recipient key given")
        recipient = _hex_field(header, "recipient", 32)
        if recipient != _raw(recipient_key.public_key()):
            raise SealError("addressed to another recipient")
        epk, nonce = _hex_field(header, "epk", 32), _hex_field(header, "nonce", 12)
        try:
            shared = recipient_key.exchange(X25519PublicKey.from_public_bytes(epk))
            plain = AESGCM(_aes_key(shared, epk, recipient)).decrypt(nonce, body, head)
        except (InvalidTag, ValueError):
            raise SealError("decryption failed (tampered)") from None
    else:
        raise SealError(f"unsupported encryption {header['enc']!r}")
    if len(plain) < SIG_BYTES:
        raise SealError("unsigned: the blob is too short to hold a signature (truncated)")
    signature, payload = plain[:SIG_BYTES], plain[SIG_BYTES:]
    try:
        verify_key.verify(signature, _to_be_signed(payload, header["recipient"], header["meta"]))
    except InvalidSignature:
        raise SealError("signature does not verify (tampered or wrong signer)") from None
    return payload, header["meta"]


# --------------------------------------------------------------------------------------------------------- files

def seal_file(src: str | Path, dst: str | Path, signer: Ed25519PrivateKey, recipient: X25519PublicKey | None = None,
              meta: dict | None = None) -> Path:
    """Seal the bytes of `src` into `dst` (written whole, then renamed into place). Returns `dst`."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_bytes(seal(Path(src).read_bytes(), signer, recipient, meta))
    tmp.replace(dst)
    return dst


def open_sealed_file(src: str | Path, verify_key: Ed25519PublicKey, recipient_key: X25519PrivateKey | None = None,
                     dst: str | Path | None = None) -> tuple[bytes, dict]:
    """Open a sealed file; return (payload, meta) and, given `dst`, also write the payload there once verified."""
    payload, meta = open_sealed(Path(src).read_bytes(), verify_key, recipient_key)
    if dst is not None:
        Path(dst).write_bytes(payload)
    return payload, meta
