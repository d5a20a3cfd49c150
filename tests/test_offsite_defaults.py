"""The offsite path with the library's defaults (BuildConfig, TuneConfig) on a tiny model: the bundle records the
emulator's measured quality, and travels through seal, tune, seal, plug with every hash checked; the size sweep's
known answer (no block dropped: plug-in = emulator-tuned)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tasks as T
from emulator.build import BuildConfig, build
from emulator.bundle import ADAPTER_FORMAT, BUNDLE_FORMAT, BundleError, load_bundle, verify_dir
from emulator.plug import check_binding, load_adapter, plug
from emulator.transport import open_sealed_dir, seal_dir
from emulator.tune import TuneConfig, tune
from model.load import load_model
from privacy.security.seal import load_identity, load_public

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import offsite_sweep  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [f"this film is {'wonderful' if i % 2 else 'dreadful'} number {i}\t{i % 2}\n" for i in range(96)]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows[:64]))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[64:]))
    return d


@pytest.fixture
def toy(monkeypatch):
    """A task whose label words differ in their first character (the tiny tokenizer reads characters)."""
    monkeypatch.setitem(T.TASKS, "toy", T.Task("toy", "classify", "Review: {sentence}\nAnswer:", ["no", "yes"],
                                               max_len=64))
    return "toy"


def test_default_bundle_records_quality_and_round_trips_sealed(identities, data, tmp_path):
    keys = identities("cloud", "owner")
    cloud, owner = load_identity(keys, "cloud"), load_identity(keys, "owner")
    tiny = load_model("tiny-llama")
    defaults = BuildConfig()
    manifest = build(replace(defaults, model="tiny-llama", progress=False), tmp_path / "bundle", loaded=tiny)
    middle = 6 - defaults.bottom - defaults.top  # tiny-llama has 6 blocks
    assert manifest["requested_drop"] == defaults.drop
    assert len(manifest["layout"]["emulator"]) == max(1, round(middle * (1 - defaults.drop))) < middle
    assert (manifest["distillation"] or {}).get("steps", 0) == defaults.distill_steps
    q = manifest["quality"]
    assert q["distillation_error"] > 0  # blocks were dropped: the emulator is not the full middle
    if manifest["distillation"]:
        assert q["distillation_error"] == pytest.approx(manifest["distillation"]["held_out_error_after"])
    assert q["zero_shot"]["gap"] == pytest.approx(q["zero_shot"]["full"] - q["zero_shot"]["emulator"])
    assert q["zero_shot"]["examples"] == defaults.quality_examples and q["language_model"]["perplexity_ratio"] > 0

    sealed = seal_dir(tmp_path / "bundle", tmp_path / "bundle.sealed", BUNDLE_FORMAT, cloud, load_public(keys, "owner"))
    got = open_sealed_dir(sealed, tmp_path / "owner" / "bundle", BUNDLE_FORMAT, load_public(keys, "cloud"), owner)
    assert got == verify_dir(tmp_path / "bundle", BUNDLE_FORMAT) and got["quality"] == q  # what the cloud measured
    cfg = replace(TuneConfig(), steps=3, batch_size=4, eval_examples=8, train_file=str(data / "train.tsv"),
                  dev_file=str(data / "dev.tsv"), progress=False)
    tune(cfg, tmp_path / "owner" / "bundle", tmp_path / "owner" / "adapter")
    sealed = seal_dir(tmp_path / "owner" / "adapter", tmp_path / "adapter.sealed", ADAPTER_FORMAT, owner,
                      load_public(keys, "cloud"))
    open_sealed_dir(sealed, tmp_path / "cloud" / "adapter", ADAPTER_FORMAT, load_public(keys, "owner"), cloud)
    adapter = load_adapter(tmp_path / "cloud" / "adapter")
    bundle = got
    check_binding(adapter, bundle, tiny.model)
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():  # something was plugged in
        assert not torch.allclose(plug(tiny.model, adapter, bundle)(ids).logits, tiny.model(ids).logits, atol=1e-4)
    weights = next(tmp_path / "cloud" / "adapter" / f for f in adapter.manifest["files"] if f.endswith(".safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-2] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        load_adapter(tmp_path / "cloud" / "adapter")
    load_bundle(tmp_path / "owner" / "bundle")  # the owner's copy is intact


def test_sweep_without_drop_plug_in_equals_emulator_tuned(toy, data, tmp_path):
    """Kept fraction 1.0: the emulator is the full middle (distillation leaves it as it is), so the adapter tuned on
    it gives the same accuracy plugged into the full model, at every seed; tuning moved it away from zero-shot, so the equality is
    not that of two untouched models."""
    res = offsite_sweep.main(["--model", "tiny-llama", "--task", toy, "--bottom", "1", "--top", "1", "--mode", "full",
                              "--lr", "0.003", "--steps", "30", "--eval-examples", "32", "--distill-steps", "5",
                              "--sweep", "0.5,1.0", "--train-file", str(data / "train.tsv"),
                              "--dev-file", str(data / "dev.tsv"), "--out", str(tmp_path / "sweep"),
                              "--log", str(tmp_path / "log.jsonl"), "--seeds", "0,1"])
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    whole = next(r for r in rows if r["kept"] == 1.0)
    assert whole["kept_blocks"] == whole["middle_blocks"] == 4 and whole["distill_error"] == 0.0
    assert whole["plug-in"] == whole["emulator fine-tuned"]
    assert [r["seed"] for r in whole["by_seed"]] == [0, 1]  # each seed's plug-in equals its emulator-tuned row
    assert all(r["plug-in"] == r["tuned"] for r in whole["by_seed"])
    assert whole["plug-in"] == pytest.approx(sum(r["plug-in"] for r in whole["by_seed"]) / 2)
    assert set(res["both"]["full_fine_tuning_by_seed"]) == {0, 1}
    assert whole["emulator fine-tuned"] != whole["emulator zero-shot"]
    assert whole["emulator zero-shot"] == res["both"]["full_model_zero_shot"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2 and (tmp_path / "sweep" / "sweep.png").is_file()
