"""Sealed bundles and adapters: signature + encryption round trips, and every way a file is refused (tampered at
any byte, unsigned, wrongly signed, wrongly addressed, of the wrong kind)."""
from __future__ import annotations

import random

import pytest

from emulator.build import BuildConfig, build
from emulator.bundle import ADAPTER_FORMAT, BUNDLE_FORMAT, BundleError, load_bundle, verify_dir
from emulator.transport import open_sealed_dir, pack, seal_dir
from emulator.tune import TuneConfig, tune
from model.load import load_model
from privacy.security.seal import load_identity, load_public, seal


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def keys(identities):  # tests/conftest.py
    return identities("cloud", "owner", "mallory")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    build(BuildConfig(model="tiny-llama", bottom=1, top=1, drop=0.5, progress=False), out,
          loaded=load_model("tiny-llama"))
    return out


@pytest.fixture(scope="module")
def adapter(bundle, tmp_path_factory):
    """A small LoRA adapter (rank 1 on q_proj), so that every one of its sealed bytes can be flipped in a test."""
    d = tmp_path_factory.mktemp("a")
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"film {i} is {'good' if i % 2 else 'bad'}\t{i % 2}\n"
                                                              for i in range(16)))
    cfg = TuneConfig(mode="lora", lora_r=1, lora_targets=("q_proj",), steps=2, batch_size=4, eval_before=False,
                     eval_examples=8, train_file=str(d / "train.tsv"), dev_file=str(d / "train.tsv"), progress=False)
    tune(cfg, bundle, d / "adapter")
    return d / "adapter"


def me(keys, name):
    return load_identity(keys, name)


def pub(keys, name):
    return load_public(keys, name)


def same_files(a, b) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def test_bundle_round_trip_signed_and_encrypted(keys, bundle, tmp_path):
    sealed = seal_dir(bundle, tmp_path / "bundle.sealed", BUNDLE_FORMAT, me(keys, "cloud"), pub(keys, "owner"))
    blob = sealed.read_bytes()
    assert b"model.layers" not in blob and b"safetensors" not in blob  # encrypted: tensor names do not show
    manifest = open_sealed_dir(sealed, tmp_path / "opened", BUNDLE_FORMAT, pub(keys, "cloud"), me(keys, "owner"))
    assert same_files(bundle, tmp_path / "opened") and manifest == verify_dir(bundle, BUNDLE_FORMAT)
    load_bundle(tmp_path / "opened")


def test_bundle_round_trip_signed_only(keys, bundle, tmp_path):
    sealed = seal_dir(bundle, tmp_path / "bundle.sealed", BUNDLE_FORMAT, me(keys, "cloud"))
    assert b"model.layers" in sealed.read_bytes()  # readable by anyone, but not alterable
    open_sealed_dir(sealed, tmp_path / "opened", BUNDLE_FORMAT, pub(keys, "cloud"))
    assert same_files(bundle, tmp_path / "opened")


def test_adapter_round_trip(keys, adapter, tmp_path):
    sealed = seal_dir(adapter, tmp_path / "adapter.sealed", ADAPTER_FORMAT, me(keys, "owner"), pub(keys, "cloud"))
    open_sealed_dir(sealed, tmp_path / "opened", ADAPTER_FORMAT, pub(keys, "owner"), me(keys, "cloud"))
    assert same_files(adapter, tmp_path / "opened")


def refusal(sealed, into, fmt, sender, recipient) -> str:
    with pytest.raises(BundleError) as e:
        open_sealed_dir(sealed, into, fmt, sender, recipient)
    assert not (into / "manifest.json").exists()  # nothing is unpacked from a refused file
    return str(e.value)


def test_refusals_say_why(keys, bundle, adapter, tmp_path):
    cloud, owner, mallory = me(keys, "cloud"), me(keys, "owner"), me(keys, "mallory")
    to_owner = seal_dir(bundle, tmp_path / "b.sealed", BUNDLE_FORMAT, cloud, pub(keys, "owner"))
    into = tmp_path / "x"
    # wrongly addressed: mallory cannot open what the cloud sealed for the owner
    assert "addressed to another recipient" in refusal(to_owner, into, BUNDLE_FORMAT, pub(keys, "cloud"), mallory)
    # wrongly signed: mallory's bundle, sealed to the owner, does not pass as the cloud's
    forged = seal_dir(bundle, tmp_path / "f.sealed", BUNDLE_FORMAT, mallory, pub(keys, "owner"))
    msg = refusal(forged, into, BUNDLE_FORMAT, pub(keys, "cloud"), owner)
    assert "signature does not verify" in msg and "'cloud'" in msg
    # unsigned: the packed folder without an envelope
    (tmp_path / "raw.zip").write_bytes(pack(bundle, BUNDLE_FORMAT))
    assert "not a Tandem sealed blob" in refusal(tmp_path / "raw.zip", into, BUNDLE_FORMAT, pub(keys, "cloud"), owner)
    # encrypted, but no key to open it
    assert "no recipient key" in refusal(to_owner, into, BUNDLE_FORMAT, pub(keys, "cloud"), None)
    # the wrong kind of file: an adapter where a bundle is expected (properly signed and addressed)
    ad = seal_dir(adapter, tmp_path / "a.sealed", ADAPTER_FORMAT, cloud, pub(keys, "owner"))
    assert "expected a 'tandem-offsite-bundle/1'" in refusal(ad, into, BUNDLE_FORMAT, pub(keys, "cloud"), owner)
    # a correctly sealed payload that is not a packed folder
    junk = tmp_path / "junk.sealed"
    junk.write_bytes(seal(b"not a zip", cloud.sign_key, pub(keys, "owner").box_pub, {"format": BUNDLE_FORMAT}))
    assert "not a packed Tandem folder" in refusal(junk, into, BUNDLE_FORMAT, pub(keys, "cloud"), owner)
    assert "no sealed file" in refusal(tmp_path / "nothing.sealed", into, BUNDLE_FORMAT, pub(keys, "cloud"), owner)


def flip(blob: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(blob)
    b[pos] ^= mask
    return bytes(b)


@pytest.mark.parametrize("encrypted", [True, False])
def test_every_byte_of_a_sealed_adapter_is_protected(keys, adapter, tmp_path, encrypted):
    """Encrypted: every single byte is flipped in turn. Signed only: every 5th byte (the envelope is shared)."""
    owner, cloud = me(keys, "owner"), me(keys, "cloud")
    sealed = seal_dir(adapter, tmp_path / "a.sealed", ADAPTER_FORMAT, owner,
                      pub(keys, "cloud") if encrypted else None)
    blob = sealed.read_bytes()
    assert len(blob) < 20_000
    target = tmp_path / "t.sealed"
    for pos in range(0, len(blob), 1 if encrypted else 5):
        target.write_bytes(flip(blob, pos))
        with pytest.raises(BundleError):
            open_sealed_dir(target, tmp_path / "opened", ADAPTER_FORMAT, pub(keys, "owner"), cloud)
    assert not (tmp_path / "opened").exists()


def test_tampering_anywhere_in_a_sealed_bundle_is_detected(keys, bundle, tmp_path):
    sealed = seal_dir(bundle, tmp_path / "b.sealed", BUNDLE_FORMAT, me(keys, "cloud"), pub(keys, "owner"))
    blob = sealed.read_bytes()
    rng = random.Random(0)
    positions = list(range(300)) + [rng.randrange(len(blob)) for _ in range(300)] + list(range(len(blob) - 50,
                                                                                              len(blob)))
    target = tmp_path / "t.sealed"
    for pos in positions:
        target.write_bytes(flip(blob, pos, rng.randrange(1, 256)))
        with pytest.raises(BundleError):
            open_sealed_dir(target, tmp_path / "opened", BUNDLE_FORMAT, pub(keys, "cloud"), me(keys, "owner"))
    target.write_bytes(blob[:-1])  # truncated
    with pytest.raises(BundleError):
        open_sealed_dir(target, tmp_path / "opened", BUNDLE_FORMAT, pub(keys, "cloud"), me(keys, "owner"))
