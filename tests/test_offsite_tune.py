"""Tuning through the emulator and plugging into the full model: only the adapter trains, the adapter files carry
exactly the adapter blocks under full-model names, the LoRA adapter is real PEFT format, plug-in is exact when nothing
was dropped, and adapters from another bundle or for another backbone are refused."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import tasks as T
from emulator.build import BuildConfig, build
from emulator.bundle import BundleError, block_of, load_bundle, renumber
from emulator.plug import check_binding, format_table, load_adapter, offsite_table, plug
from emulator.tune import TuneConfig, merge_lora, tune
from model.load import load_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [f"this film is {'wonderful' if i % 2 else 'dreadful'} number {i}\t{i % 2}\n" for i in range(56)]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows[:40]))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[40:]))
    return d


def bundle_of(tiny, path, drop):
    build(BuildConfig(model="tiny-llama", bottom=1, top=1, drop=drop, progress=False), path, loaded=tiny)
    return path


@pytest.fixture(scope="module")
def dropped(tiny, tmp_path_factory):
    return bundle_of(tiny, tmp_path_factory.mktemp("b") / "bundle", 0.5)  # keeps blocks 0, 1, 4, 5


@pytest.fixture(scope="module")
def undropped(tiny, tmp_path_factory):
    return bundle_of(tiny, tmp_path_factory.mktemp("b0") / "bundle", 0.0)


def config(data, mode, steps=4, **kw) -> TuneConfig:
    return TuneConfig(mode=mode, steps=steps, batch_size=4, lr=1e-2 if mode == "lora" else 1e-3, eval_examples=16,
                      train_file=str(data / "train.tsv"), dev_file=str(data / "dev.tsv"), progress=False,
                      lora_targets=("q_proj", "v_proj"), **kw)


def test_full_mode_trains_only_the_adapter_blocks(tiny, dropped, data, tmp_path):
    before = load_bundle(dropped).model.state_dict()
    m = tune(config(data, "full"), dropped, tmp_path / "adapter")
    after = m["_adapter"].model.state_dict()
    changed = {block_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {0, 3}  # the compact model's first and last block = full-model blocks 0 and 5
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert {block_of(k) for k in saved} == {0, 5}  # named as in the full model
    assert torch.equal(saved["model.layers.5.mlp.up_proj.weight"], after["model.layers.3.mlp.up_proj.weight"])
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["mode"] == "full" and manifest["blocks"] == [0, 5] and manifest["training"]["steps"] == 4
    assert "losses" not in manifest["training"]  # the record that travels is a summary
    # the adapter that travels gives the cloud the owner's figures: same dev examples, same emulator, same weights
    res = offsite_table(tiny.model, T.tiny_tokenizer(), load_bundle(dropped), load_adapter(tmp_path / "adapter"),
                        eval_examples=16, reference_steps=0, progress=False, train_file=str(data / "train.tsv"),
                        dev_file=str(data / "dev.tsv"))
    assert res["rows"]["emulator zero-shot"] == m["emulator_zero_shot"]
    assert res["rows"]["emulator fine-tuned"] == m["emulator_fine_tuned"]


def test_training_lowers_the_loss(dropped, data, tmp_path):
    m = tune(config(data, "full", steps=30), dropped, tmp_path / "adapter")
    losses = m["training"]["losses"]
    # (a tiny random model's frozen, tied embedding bounds how low the loss can go: about 4.4 here)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3 and losses[-1] < losses[0] - 1.0


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_plug_in_is_exact_without_drop(tiny, undropped, data, tmp_path, mode):
    """With no block dropped the emulator is the full model, so the plugged model must equal the owner's model."""
    m = tune(config(data, mode), undropped, tmp_path / "adapter")
    owner_model = m["_adapter"].model
    ids = torch.randint(3, 300, (2, 13))
    base = logits(tiny.model, ids)
    plugged = plug(tiny.model, load_adapter(tmp_path / "adapter"), load_bundle(undropped).manifest)
    assert torch.allclose(logits(plugged, ids), logits(owner_model, ids), atol=1e-5)
    assert not torch.allclose(logits(plugged, ids), base, atol=1e-3)  # something was plugged in ...
    assert torch.equal(logits(tiny.model, ids), base)  # ... into a copy: the cloud's model is untouched


def test_lora_adapter_is_peft_format_for_the_full_model(tiny, dropped, data, tmp_path):
    tune(config(data, "lora"), dropped, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "peft" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0, 5] and cfg["peft_type"] == "LORA"
    adapter = load_adapter(tmp_path / "adapter")
    ours = plug(tiny.model, adapter, load_bundle(dropped).manifest)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(tmp_path / "adapter" / "peft")).eval()
    ids = torch.randint(3, 300, (2, 9))
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5)
    assert not torch.allclose(logits(ours, ids), logits(tiny.model, ids), atol=1e-4)


def test_adapters_are_bound_to_their_bundle_and_backbone(tiny, dropped, undropped, data, tmp_path):
    tune(config(data, "full", steps=1), dropped, tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    check_binding(adapter, load_bundle(dropped).manifest, tiny.model)
    with pytest.raises(BundleError, match="different bundle"):
        check_binding(adapter, load_bundle(undropped).manifest, tiny.model)
    other = load_model("tiny-llama", seed=1).model
    with pytest.raises(BundleError, match="fingerprint mismatch"):
        plug(other, adapter, load_bundle(dropped).manifest)
    weights = tmp_path / "adapter" / "adapter.safetensors"
    data_ = bytearray(weights.read_bytes())
    data_[-3] ^= 0x10
    weights.write_bytes(bytes(data_))
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        load_adapter(tmp_path / "adapter")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_offsite_table(tiny, undropped, data, tmp_path, mode):
    """Every row is measured; with nothing dropped the emulator is the full model, so the emulator rows equal the
    full-model rows; the reference run tunes the full model's adapter blocks and nothing else."""
    tune(config(data, mode), undropped, tmp_path / "adapter")
    full = copy.deepcopy(tiny.model)
    res = offsite_table(full, T.tiny_tokenizer(), load_bundle(undropped), load_adapter(tmp_path / "adapter"),
                        eval_examples=16, reference_steps=3, progress=False, train_file=str(data / "train.tsv"),
                        dev_file=str(data / "dev.tsv"))
    rows = res["rows"]
    assert list(rows) == ["full model zero-shot", "emulator zero-shot", "emulator fine-tuned", "plug-in",
                          "full fine-tuning"]
    assert rows["emulator zero-shot"] == rows["full model zero-shot"]
    assert rows["plug-in"] == rows["emulator fine-tuned"]
    assert res["reference_training"]["steps"] == 3 and res["dev_examples"] == 16
    before, after = tiny.model.state_dict(), full.state_dict()
    changed = {block_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == ({0, 5} if mode == "full" else set())  # LoRA reference: hooks, the weights stay
    text = format_table(res)
    assert "plug-in" in text and "ratio" in text


def test_gpt2_family_lora_round_trip(data, tmp_path):
    """A second family (learned positions, Conv1D weights stored [in, out]): bundle, LoRA tuning, PEFT-exact plug-in."""
    gpt2 = load_model("tiny-gpt2")
    build(BuildConfig(model="tiny-gpt2", bottom=1, top=1, drop=0.5, progress=False), tmp_path / "bundle",
          loaded=gpt2)
    emu = load_bundle(tmp_path / "bundle")
    assert emu.layout.kept == (0, 1, 3) and emu.model.config.n_layer == 3
    cfg = config(data, "lora")
    cfg.lora_targets = ("c_attn", "c_fc")
    tuned = tune(cfg, tmp_path / "bundle", tmp_path / "adapter")["_adapter"]
    ours = plug(gpt2.model, load_adapter(tmp_path / "adapter"), emu.manifest)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2.model), str(tmp_path / "adapter" / "peft")).eval()
    ids = torch.randint(3, 300, (2, 9))
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5)
    assert not torch.allclose(logits(ours, ids), logits(gpt2.model, ids), atol=1e-4)
    before = logits(tuned.model, ids)
    tuned.merge()  # folding LoRA into the Conv1D weights gives the same function
    assert torch.allclose(logits(tuned.model, ids), before, atol=1e-5)


@pytest.mark.parametrize("name, targets, scaling", [("tiny-llama", ("q_proj", "down_proj"), 2.0),
                                                    ("tiny-gpt2", ("c_attn", "c_fc"), 16 / 6)])
def test_merge_lora_is_w_plus_scaling_b_a(name, targets, scaling):
    """`merge_lora` (PEFT's merge_and_unload) adds scaling B A to each LoRA site's weight, transposed for GPT-2's
    Conv1D ([in, out]), at the blocks `to_model` renumbers the adapter to, and changes nothing else in the model."""
    model = load_model(name).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m).__name__ for m in model.modules()]
    frozen = dict(model.named_parameters())[next(k for k, _ in model.named_parameters() if "norm" in k or "ln_" in k)]
    frozen.requires_grad_(False)
    to_model, g, state, expected = {1: 0, 5: 2}, torch.Generator().manual_seed(0), {}, {}
    for key, w in model.named_parameters():
        site = key.removesuffix(".weight")
        if block_of(key) not in to_model.values() or not site.endswith(targets):
            continue
        n_in, n_out = w.shape[::-1] if name == "tiny-llama" else w.shape
        a, b = torch.randn(6, n_in, generator=g), torch.randn(n_out, 6, generator=g)
        full_site = renumber(site, {v: k for k, v in to_model.items()})
        state[f"base_model.model.{full_site}.lora_A.weight"] = a
        state[f"base_model.model.{full_site}.lora_B.weight"] = b
        delta = scaling * b @ a
        expected[key] = w.detach() + (delta if name == "tiny-llama" else delta.T)
    assert len(expected) == 2 * len(targets)
    merge_lora(model, state, scaling, to_model)
    after = model.state_dict()
    for key, w in after.items():
        torch.testing.assert_close(w, expected.get(key, before[key]), rtol=0, atol=1e-5 if key in expected else 0)
    assert [type(m).__name__ for m in model.modules()] == kinds and not hasattr(model, "peft_config")
    assert not frozen.requires_grad and model.get_input_embeddings().weight.requires_grad  # as they were


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_top_only_tuning_leaves_the_bottom_adapter_and_plugs_exactly(tiny, undropped, data, tmp_path, mode):
    """train_blocks="top": only the top adapter block trains and travels; the cloud's reference tunes the same block;
    with nothing dropped the plugged model is the owner's model."""
    m = tune(config(data, mode, train_blocks="top"), undropped, tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.blocks == [5] and adapter.manifest["train_blocks"] == "top"
    assert {block_of(k) for k in adapter.tensors} == {5}
    ids = torch.randint(3, 300, (2, 13))
    plugged = plug(tiny.model, adapter, load_bundle(undropped).manifest)
    assert torch.allclose(logits(plugged, ids), logits(m["_adapter"].model, ids), atol=1e-5)
    full = copy.deepcopy(tiny.model)
    res = offsite_table(full, T.tiny_tokenizer(), load_bundle(undropped), adapter, eval_examples=16, reference_steps=2,
                        progress=False, train_file=str(data / "train.tsv"), dev_file=str(data / "dev.tsv"))
    assert res["tuned"] == [5] and res["rows"]["plug-in"] == res["rows"]["emulator fine-tuned"]
    changed = {block_of(k) for k, v in tiny.model.state_dict().items() if not torch.equal(v, full.state_dict()[k])}
    assert changed == ({5} if mode == "full" else set())
    with pytest.raises(ValueError, match="train_blocks"):
        tune(config(data, mode, train_blocks="middle"), undropped, tmp_path / "other")
