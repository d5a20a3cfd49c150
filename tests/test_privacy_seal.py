"""Signed and encrypted blobs: round trips, every refusal with its exact reason, and tamper detection byte by byte."""
from __future__ import annotations

import json
import os
import random
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.security import seal as S
from privacy.security.seal import SealError, generate_identity, load_identity, load_public, open_sealed, open_sealed_file
from privacy.security.seal import seal, seal_file


@pytest.fixture(scope="module")
def keys(identities):  # tests/conftest.py
    return identities("alice", "bob", "carol")


@pytest.fixture(scope="module")
def alice(keys):
    return load_identity(keys, "alice")


@pytest.fixture(scope="module")
def bob(keys):
    return load_identity(keys, "bob")


@pytest.fixture(scope="module")
def carol(keys):
    return load_identity(keys, "carol")


def reason(blob, verify_key, recipient_key=None) -> str:
    with pytest.raises(SealError) as e:
        open_sealed(blob, verify_key, recipient_key)
    return str(e.value)


def test_identity_files(keys, alice):
    names = sorted(p.name for p in keys.iterdir() if p.name.startswith("alice."))
    assert names == ["alice.box.key", "alice.box.pub", "alice.sign.key", "alice.sign.pub"]
    for n in ("alice.box.key", "alice.sign.key"):
        assert stat.S_IMODE((keys / n).stat().st_mode) == 0o600
    assert (keys / "alice.sign.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    pub = load_public(keys, "alice")
    assert pub.verify_key.public_bytes_raw() == alice.sign_key.public_key().public_bytes_raw()
    assert pub.box_pub.public_bytes_raw() == alice.box_key.public_key().public_bytes_raw()
    with pytest.raises(FileExistsError, match="already exists"):
        generate_identity(keys, "alice")
    with pytest.raises(FileNotFoundError, match="generate_identity"):
        load_public(keys, "nobody")


def test_round_trip_signed_only(alice):
    payload = os.urandom(1000)
    blob = seal(payload, alice.sign_key, meta={"kind": "adapter", "step": 3, "ranks": [4, 8]})
    assert payload in blob  # signed only: readable by anyone, but not alterable
    assert open_sealed(blob, alice.sign_key.public_key()) == (payload, {"kind": "adapter", "step": 3,
                                                                          "ranks": [4, 8]})
    # a recipient key is not needed to open a signed-only blob, and does not hurt
    assert open_sealed(blob, alice.sign_key.public_key(), S.X25519PrivateKey.generate())[0] == payload


def test_round_trip_signed_and_encrypted(alice, bob):
    payload = b"secret adapter weights " * 50
    blob = seal(payload, alice.sign_key, recipient=bob.box_key.public_key(), meta={"kind": "bundle"})
    assert b"secret adapter" not in blob
    assert open_sealed(blob, alice.sign_key.public_key(), bob.box_key) == (payload, {"kind": "bundle"})
    # fresh ephemeral key and nonce each time: the same payload never seals to the same bytes
    assert seal(payload, alice.sign_key, recipient=bob.box_key.public_key()) != \
        seal(payload, alice.sign_key, recipient=bob.box_key.public_key())


def test_empty_payload(alice, bob):
    blob = seal(b"", alice.sign_key, recipient=bob.box_key.public_key())
    assert open_sealed(blob, alice.sign_key.public_key(), bob.box_key) == (b"", {})


def test_refusals_name_the_reason(alice, bob, carol):
    a_pub = alice.sign_key.public_key()
    signed = seal(b"payload", alice.sign_key)
    to_bob = seal(b"payload", alice.sign_key, recipient=bob.box_key.public_key())
    assert reason(b"hello, world", a_pub) == "not a Tandem sealed blob (bad magic)"
    assert reason(b"", a_pub) == "not a Tandem sealed blob (bad magic)"
    assert reason(signed, carol.sign_key.public_key()) == "signature does not verify (tampered or wrong signer)"
    assert reason(to_bob, carol.sign_key.public_key(), bob.box_key) == \
        "signature does not verify (tampered or wrong signer)"
    assert reason(to_bob, a_pub, carol.box_key) == "addressed to another recipient"
    assert reason(to_bob, a_pub) == "encrypted but no recipient key given"
    tampered = bytearray(to_bob)
    tampered[-1] ^= 1
    assert reason(bytes(tampered), a_pub, bob.box_key) == "decryption failed (tampered)"
    tampered = bytearray(signed)
    tampered[-1] ^= 1
    assert reason(bytes(tampered), a_pub) == "signature does not verify (tampered or wrong signer)"
    assert reason(signed[:-3], a_pub) == "signature does not verify (tampered or wrong signer)"
    assert reason(signed[:20], a_pub).startswith("malformed sealed blob")
    assert reason(signed[:S._PREFIX.size + 40], a_pub).startswith("malformed sealed blob")


def test_unsigned_blob_is_refused(alice, bob):
    """A blob whose header declares no signature, or whose body is too short to hold one, never opens."""
    header = {"enc": None, "epk": None, "meta": {}, "nonce": None, "recipient": None, "sig": None}
    assert reason(S._head(header) + b"payload", alice.sign_key.public_key()) == \
        "unsigned: the blob carries no signature"
    header["sig"] = "ed25519"
    assert reason(S._head(header) + b"short", alice.sign_key.public_key()).startswith("unsigned")
    # an encrypted blob whose plaintext carries no signature: decrypts fine, still refused
    eph, nonce = X25519PrivateKey.generate(), os.urandom(12)
    epk, rcpt = eph.public_key().public_bytes_raw(), bob.box_key.public_key().public_bytes_raw()
    header.update(enc=S.ENC_ALG, epk=epk.hex(), nonce=nonce.hex(), recipient=rcpt.hex())
    head = S._head(header)
    body = AESGCM(S._aes_key(eph.exchange(bob.box_key.public_key()), epk, rcpt)).encrypt(nonce, b"tiny", head)
    assert reason(head + body, alice.sign_key.public_key(), bob.box_key).startswith("unsigned")


def test_blob_cannot_be_readdressed(alice, bob, carol):
    """Bob decrypts a blob Alice sealed to him and re-encrypts Alice's signed content to Carol: Carol refuses it."""
    blob = seal(b"for bob only", alice.sign_key, recipient=bob.box_key.public_key(), meta={"to": "bob"})
    header, head, body = S._parse(blob)
    shared = bob.box_key.exchange(S.X25519PublicKey.from_public_bytes(bytes.fromhex(header["epk"])))
    key = S._aes_key(shared, bytes.fromhex(header["epk"]), bytes.fromhex(header["recipient"]))
    inner = AESGCM(key).decrypt(bytes.fromhex(header["nonce"]), body, head)  # Alice's signature || payload
    eph, nonce = X25519PrivateKey.generate(), os.urandom(12)
    epk, rcpt = eph.public_key().public_bytes_raw(), carol.box_key.public_key().public_bytes_raw()
    header.update(epk=epk.hex(), nonce=nonce.hex(), recipient=rcpt.hex())
    head = S._head(header)
    forged = head + AESGCM(S._aes_key(eph.exchange(carol.box_key.public_key()), epk, rcpt)).encrypt(nonce, inner,
                                                                                                     head)
    assert reason(forged, alice.sign_key.public_key(), carol.box_key) == \
        "signature does not verify (tampered or wrong signer)"


def test_meta_is_signed(alice):
    blob = seal(b"w", alice.sign_key, meta={"step": 1})
    forged = blob.replace(b'"step":1', b'"step":9')
    assert forged != blob
    assert reason(forged, alice.sign_key.public_key()) == "signature does not verify (tampered or wrong signer)"


def test_header_must_be_canonical(alice):
    """Equivalent-but-different JSON (a space) is refused: the bytes on disk are exactly what was signed."""
    blob = seal(b"w", alice.sign_key, meta={"a": 1})
    header, head, body = S._parse(blob)
    raw = json.dumps(header, sort_keys=True).encode()  # default separators: ", " and ": "
    loose = S._PREFIX.pack(S.MAGIC, S.VERSION, len(raw)) + raw + body
    assert reason(loose, alice.sign_key.public_key()).startswith("malformed header")


def flipped(blob: bytes, pos: int, mask: int) -> bytes:
    b = bytearray(blob)
    b[pos] ^= mask
    return bytes(b)


@pytest.mark.parametrize("encrypted", [False, True])
def test_every_single_byte_flip_is_detected(alice, bob, encrypted):
    recipient = bob.box_key.public_key() if encrypted else None
    payload = b"small adapter"
    blob = seal(payload, alice.sign_key, recipient=recipient, meta={"kind": "adapter", "rank": 8})
    assert open_sealed(blob, alice.sign_key.public_key(), bob.box_key)[0] == payload
    for pos in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            with pytest.raises(SealError):
                open_sealed(flipped(blob, pos, mask), alice.sign_key.public_key(), bob.box_key)


@pytest.mark.parametrize("encrypted", [False, True])
def test_random_byte_flips_in_a_large_blob_are_detected(alice, bob, encrypted):
    recipient = bob.box_key.public_key() if encrypted else None
    blob = seal(os.urandom(1 << 20), alice.sign_key, recipient=recipient, meta={"kind": "bundle"})
    rng = random.Random(0)
    for _ in range(200):
        pos, mask = rng.randrange(len(blob)), rng.randrange(1, 256)
        with pytest.raises(SealError):
            open_sealed(flipped(blob, pos, mask), alice.sign_key.public_key(), bob.box_key)


def test_files(tmp_path, alice, bob):
    src = tmp_path / "adapter.safetensors"
    src.write_bytes(os.urandom(5000))
    sealed = seal_file(src, tmp_path / "adapter.sealed", alice.sign_key, bob.box_key.public_key(), {"v": 1})
    assert sealed.exists() and not (tmp_path / "adapter.sealed.part").exists()
    out = tmp_path / "out.bin"
    payload, meta = open_sealed_file(sealed, alice.sign_key.public_key(), bob.box_key, dst=out)
    assert payload == src.read_bytes() == out.read_bytes() and meta == {"v": 1}
    sealed.write_bytes(flipped(sealed.read_bytes(), 100, 1))
    out.unlink()
    with pytest.raises(SealError):
        open_sealed_file(sealed, alice.sign_key.public_key(), bob.box_key, dst=out)
    assert not out.exists()  # nothing is written from a blob that does not verify


def test_wrong_key_types_are_named(alice, bob):
    blob = seal(b"x", alice.sign_key, recipient=bob.box_key.public_key())
    with pytest.raises(TypeError, match="verify_key must be an Ed25519PublicKey"):
        open_sealed(blob, alice.sign_key, bob.box_key)
    with pytest.raises(TypeError, match="recipient_key must be an X25519PrivateKey"):
        open_sealed(blob, alice.sign_key.public_key(), bob.box_key.public_key())


def test_meta_must_be_json(alice):
    with pytest.raises(TypeError):
        seal(b"x", alice.sign_key, meta={"obj": object()})
    with pytest.raises(ValueError):
        seal(b"x", alice.sign_key, meta={"nan": float("nan")})
