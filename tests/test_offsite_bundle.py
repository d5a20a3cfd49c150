"""Offsite bundles: uniform layer drop, what a bundle holds (never the dropped blocks), hash checks on load,
and distillation moving the emulator toward the full middle (its states, and with Jacobian matching its gradients).
Tiny random Llama, so everything runs in seconds."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tasks as T
from emulator.build import BuildConfig, build, make_layout, uniform_drop
from emulator.bundle import (BUNDLE_FORMAT, BundleError, WEIGHTS, block_of, compact_model, load_bundle,
                             write_manifest)
from emulator.distill import MiddlePair, dev_batches
from model.load import load_model
from model.segments import family_of


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    build(BuildConfig(model="tiny-llama", bottom=1, top=1, drop=0.5, distill_steps=0, progress=False), out,
          loaded=tiny)  # layer drop alone: the distilled default is tested in test_offsite_defaults.py
    return out


def test_uniform_drop_keeps_evenly_spaced_blocks():
    middle = list(range(2, 28))  # SmolLM2: 30 blocks, 2 + 2 adapter blocks
    assert uniform_drop(middle, 0.0) == middle
    assert uniform_drop(middle, 0.5) == [2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27]
    kept = uniform_drop(middle, 2 / 3)
    assert len(kept) == 9 and kept[0] == 2 and kept[-1] == 27
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert max(gaps) - min(gaps) <= 1  # uniform
    assert uniform_drop(middle, 0.99) == [2]
    with pytest.raises(ValueError, match="drop ratio"):
        uniform_drop(middle, 1.0)


def test_layout():
    lay = make_layout(30, 2, 2, 0.5)
    assert lay.bottom == (0, 1) and lay.top == (28, 29) and lay.adapter == (0, 1, 28, 29)
    assert lay.kept == (0, 1, *lay.emulator, 28, 29) and lay.position(28) == len(lay.kept) - 2
    assert lay.drop_ratio == pytest.approx(0.5)
    with pytest.raises(ValueError):
        make_layout(6, 3, 3, 0.5)


def test_bundle_holds_exactly_the_kept_blocks(bundle, tiny):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == BUNDLE_FORMAT and manifest["family"] == "llama"
    assert manifest["layout"] == {"num_layers": 6, "bottom": [0], "top": [5], "emulator": [1, 4]}
    assert manifest["drop_ratio"] == 0.5 and manifest["distillation"] is None
    state = load_file(str(bundle / WEIGHTS))
    assert {block_of(k) for k in state} - {None} == {0, 1, 4, 5}  # blocks 2 and 3 were dropped: not shipped
    assert "lm_head.weight" not in state  # tied to the embedding, stored once
    full = tiny.model.state_dict()
    for k, v in state.items():  # undistilled: every shipped tensor is the full model's, under its full-model name
        assert torch.equal(v, full[k]), k
    assert manifest["parameters"]["bundle"] == sum(v.numel() for v in state.values()) < manifest["parameters"]["full"]


def test_gradient_alignment_is_one_without_drop(tiny, tmp_path):
    manifest = build(BuildConfig(model="tiny-llama", bottom=1, top=1, drop=0.0, distill_steps=0, progress=False),
                     tmp_path / "b", loaded=tiny)
    assert manifest["gradient_alignment"] == {"bundle": {"0": pytest.approx(1.0, abs=1e-4),
                                                         "5": pytest.approx(1.0, abs=1e-4)}}


def test_loaded_bundle_is_the_compact_model(bundle, tiny):
    emu = load_bundle(bundle)
    assert emu.model.config.num_hidden_layers == 4 and emu.adapter_positions == [0, 3]
    ref = compact_model(tiny.model, emu.layout)
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        assert torch.equal(emu.model(ids).logits, ref(ids).logits)
        # and it is a different function from the full model: the emulator is lossy
        assert (emu.model(ids).logits - tiny.model(ids).logits).abs().max() > 1e-3


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_manifest_hashes_are_checked_on_load(bundle, tmp_path):
    flipped = _copy(bundle, tmp_path / "flipped")
    data = bytearray((flipped / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        load_bundle(flipped)

    missing = _copy(bundle, tmp_path / "missing")
    (missing / WEIGHTS).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(missing)

    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)

    wrong = _copy(bundle, tmp_path / "wrong")
    m = json.loads((wrong / "manifest.json").read_text())
    (wrong / "manifest.json").write_text(json.dumps({**m, "format": "something-else/1"}))
    with pytest.raises(BundleError, match="expected a 'tandem-offsite-bundle/1'"):
        load_bundle(wrong)


def test_bundle_with_a_dropped_blocks_weights_is_refused(bundle, tiny, tmp_path):
    """Even with consistent hashes, a bundle may not carry a block its layout says was dropped."""
    bad = _copy(bundle, tmp_path / "bad")
    state = load_file(str(bad / WEIGHTS))
    state.update({k: v for k, v in tiny.model.state_dict().items() if block_of(k) == 2})
    save_file(state, str(bad / WEIGHTS))
    m = json.loads((bad / "manifest.json").read_text())
    m.pop("files")
    write_manifest(bad, m)
    with pytest.raises(BundleError, match=r"blocks \[2\]"):
        load_bundle(bad)


def test_distillation_moves_the_emulator_toward_the_full_middle(tiny, tmp_path):
    cfg = BuildConfig(model="tiny-llama", bottom=1, top=1, drop=0.75, distill_steps=30, distill_lr=3e-3,
                      distill_batch=4, distill_seq=32, distill_eval_batches=2, progress=False)
    manifest = build(cfg, tmp_path / "distilled", loaded=tiny)
    rec = manifest["distillation"]
    assert rec["steps"] == 30 and rec["data"].startswith("wikitext2")
    assert rec["held_out_error_after"] < 0.9 * rec["held_out_error_before"]
    # and the adapter blocks' gradients through the emulator point more like the full model's
    before, after = manifest["gradient_alignment"]["before_distillation"], manifest["gradient_alignment"]["bundle"]
    assert set(before) == set(after) == {"0", "5"}
    assert all(after[b] > before[b] + 0.1 for b in before)
    state = load_file(str(tmp_path / "distilled" / WEIGHTS))
    full = tiny.model.state_dict()
    emulator_block = manifest["layout"]["emulator"][0]
    changed = [k for k, v in state.items() if not torch.equal(v, full[k])]
    assert changed and all(block_of(k) == emulator_block for k in changed)  # adapter and embedding untouched


def test_gradient_matching_targets_are_the_full_models_gradients(tiny):
    """Without drop the emulator is the middle: it passes down exactly the teacher's gradients; and the teacher's
    gradient at the middle's input is (up to the one scale) the full model's LM-loss gradient there, read off the
    model's own forward."""
    cfg = BuildConfig(model="tiny-llama", bottom=1, top=1, distill_batch=4, distill_seq=32)
    layout = make_layout(6, 1, 1, 0.0)
    tok = T.tiny_tokenizer()
    pair = MiddlePair(tiny.model, compact_model(tiny.model, layout), layout, gradient_weight=1.0)
    batch = dev_batches(tok, cfg)[0]
    h, t, g_out, g_in = pair.inputs_and_targets(batch)
    _, states, grads = pair.state_and_gradient_errors((h, t, g_out, g_in), batch.attention_mask, create_graph=False)
    assert states.item() < 1e-10 and grads.item() < 1e-10
    seen = {}

    def leaf(module, args, kwargs):
        seen["h"] = args[0].detach().requires_grad_(True)
        return (seen["h"],) + args[1:], kwargs
    hook = family_of(tiny.model).blocks(tiny.model)[1].register_forward_pre_hook(leaf, with_kwargs=True)
    try:
        out = tiny.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        loss, _ = T.loss_from_hidden(T.TASKS["wikitext2"], out.last_hidden_state, batch,
                                     tiny.model.get_output_embeddings())
        (true,) = torch.autograd.grad(loss, [seen["h"]])
    finally:
        hook.remove()
    assert torch.nn.functional.cosine_similarity(true.flatten(), g_in.flatten(), dim=0) > 0.9999


def test_gradient_matching_distillation_lowers_both_errors(tiny, tmp_path):
    cfg = BuildConfig(model="tiny-llama", bottom=1, top=1, drop=0.75, distill_steps=30, distill_lr=3e-3,
                      distill_batch=4, distill_seq=32, distill_eval_batches=2, distill_gradient_weight=1.0,
                      progress=False)
    rec = build(cfg, tmp_path / "jacobian", loaded=tiny)["distillation"]
    assert rec["gradient_weight"] == 1.0 and "J_e(h)^T g" in rec["objective"]
    assert rec["held_out_error_after"] < 0.9 * rec["held_out_error_before"]
    assert rec["held_out_gradient_error_after"] < 0.9 * rec["held_out_gradient_error_before"]
