"""The label defences on the gradients the edge sends: label-free margin gradients, and the secret per-example mask."""
from __future__ import annotations

import math

import pytest
import torch

from edge import remote
from edge.config import EdgeConfig
from edge.methods import check_method
import tasks as T
from privacy.defences.labels import margin_loss, mask_factors, per_row
from tests.conftest import make_edge, randomize_lora_b, sst2_batches


def test_factors_are_signed_log_uniform_in_range_and_reproducible():
    w = mask_factors(4000, 4.0, torch.Generator().manual_seed(3))
    assert w.dtype == torch.float64 and w.shape == (4000,)
    assert w.abs().min() >= 1 / 4 and w.abs().max() <= 4
    assert 0.45 < (w > 0).double().mean() < 0.55  # half the directions flipped
    log_abs = w.abs().log()
    assert abs(log_abs.mean().item()) < 0.05 and abs(log_abs.std().item() - math.log(4) / math.sqrt(3)) < 0.03
    torch.testing.assert_close(w, mask_factors(4000, 4.0, torch.Generator().manual_seed(3)))
    assert mask_factors(5, 1.0).abs().eq(1).all()  # R = 1: signs only
    with pytest.raises(ValueError, match=">= 1"):
        mask_factors(3, 0.5)


def test_per_row_broadcasts_over_the_batch_dimension():
    like = torch.ones(3, 2, 4, dtype=torch.bfloat16)
    f = per_row(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), like)
    assert f.shape == (3, 1, 1) and f.dtype == torch.bfloat16
    assert (like * f)[1].eq(-2).all()


def _step(cloud, tiny, loss_of=None, flip=False, **kw):
    """One training step: (the gradient sent to the cloud, the LoRA gradients by name, the loss, every tensor the edge
    encoded for the wire in order); `loss_of(em, batch)` instead of the edge's own loss; `flip`: the batch with
    every label (and answer token) swapped."""
    em, tok, link = make_edge(cloud, tiny, k=1, m=1, **kw)
    randomize_lora_b(em.lora)
    batch = sst2_batches(1, batch_size=8)[0]
    if flip:
        ids = torch.tensor(T.label_token_ids(T.TASKS["sst2"], tok))
        batch.label = 1 - batch.label
        batch.target = ids[batch.label]
    sent, wire = [], []
    real_backward, real_encode = remote._Exchange.backward, remote.encode

    def spy(self, grad_out, *rest):
        sent.append(grad_out.detach().clone())
        return real_backward(self, grad_out, *rest)

    def encode_spy(t, *rest, **kw):
        wire.append(t.detach().clone())
        return real_encode(t, *rest, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote._Exchange, "backward", spy)
        mp.setattr(remote, "encode", encode_spy)
        loss = em.loss(batch)[0] if loss_of is None else loss_of(em, batch)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in em.lora.named_parameters() if p.grad is not None}
    link.close()
    return sent[0], grads, loss.item(), wire


@pytest.mark.parametrize("mode", ["none", "edge"])
def test_masked_gradient_is_scaled_per_example_and_edge_grads_are_unchanged(cloud, tiny, mode):
    """The frozen split and DLoRA (whose cloud-block LoRA gradients the edge computes from masked rows)."""
    clean_sent, clean_grads, _, _ = _step(cloud, tiny, cloud_lora=mode)
    sent, grads, _, _ = _step(cloud, tiny, cloud_lora=mode, noise_label_mask=4.0)
    w = mask_factors(8, 4.0, torch.Generator().manual_seed(0))  # the edge's secret: --seed 0's generator
    torch.testing.assert_close(sent, clean_sent * per_row(w, clean_sent), rtol=1e-5, atol=0)
    assert (w > 0).any() and (w < 0).any()  # some examples' gradient really arrives flipped
    assert not torch.allclose(sent, clean_sent)
    assert grads.keys() == clean_grads.keys() and grads
    _assert_grads_close(grads, clean_grads)


def _assert_grads_close(grads, reference):
    assert grads.keys() == reference.keys() and grads
    for name, g in grads.items():  # float32 rounding only
        scale = reference[name].abs().max().item()
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def _two_way_loss(em, batch):
    """The reference: the two-way label-word loss through plain autograd, the cloud getting dL/d its output."""
    rows = torch.arange(batch.input_ids.shape[0])
    logits = em.top.lm_head(em.hidden(batch)[rows, batch.answer_pos])[:, em_label_ids(em)]
    return margin_loss(logits, batch.label)[0]


def em_label_ids(em):
    return T.label_token_ids(em.task, T.tiny_tokenizer())


@pytest.mark.parametrize("mode", ["none", "edge"])
def test_label_free_gradients_do_not_depend_on_the_labels_and_train_the_two_way_loss(cloud, tiny, monkeypatch, mode):
    """--noise-label-free: everything the edge sends (hidden state, DLoRA's branch outputs and replies, the output
    gradient) is bit for bit the same with every label flipped, and the edge's weights (DLoRA: the cloud blocks' LoRA
    too) get the gradient of the two-way label-word loss as plain autograd through the cloud gives it.
    (The stand-in tokenizer reads characters: label words without the leading space start with different tokens.)"""
    import dataclasses
    monkeypatch.setitem(T.TASKS, "sst2", dataclasses.replace(T.TASKS["sst2"], label_words=["negative", "positive"]))
    assert len(set(T.label_token_ids(T.TASKS["sst2"], T.tiny_tokenizer()))) == 2
    sent, grads, loss, wire = _step(cloud, tiny, cloud_lora=mode, noise_label_free=True)
    flipped, flipped_grads, flipped_loss, flipped_wire = _step(cloud, tiny, cloud_lora=mode, noise_label_free=True,
                                                               flip=True)
    assert len(wire) == len(flipped_wire) and len(wire) >= (2 if mode == "none" else 5)
    assert all(torch.equal(a, b) for a, b in zip(wire, flipped_wire))  # what crosses does not depend on the labels
    assert loss != pytest.approx(flipped_loss)  # while the labels did change the loss ...
    assert any(not torch.allclose(g, flipped_grads[n]) for n, g in grads.items())  # ... and the edge's update
    ref_sent, ref_grads, ref_loss, _ = _step(cloud, tiny, cloud_lora=mode, loss_of=_two_way_loss)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    _assert_grads_close(grads, ref_grads)
    assert len(grads) == (2 if mode == "none" else 6) * 4  # DLoRA: the 4 cloud blocks' LoRA A, B of q and v too
    assert not torch.allclose(sent, ref_sent)  # the plain two-way gradient is what would have crossed: it differs
    clean_sent, _, _, _ = _step(cloud, tiny, cloud_lora=mode)
    assert not torch.allclose(flipped, clean_sent)


def test_label_free_takes_two_class_tasks_only():
    from edge.methods import check_task_defences
    check_task_defences(EdgeConfig.of(noise_label_free=True), T.TASKS["sst2"])
    with pytest.raises(ValueError, match="two-class task.*agnews has 4 classes"):
        check_task_defences(EdgeConfig.of(noise_label_free=True), T.TASKS["agnews"])


@pytest.mark.parametrize("flag", [{"noise_label_mask": 4.0}, {"noise_label_free": True}])
def test_label_defences_are_refused_where_the_factors_would_not_apply(flag):
    check_method(EdgeConfig.of(model="tiny-llama", cloud_lora="edge", **flag))
    with pytest.raises(ValueError, match="sums the weight gradients"):
        check_method(EdgeConfig.of(model="tiny-llama", cloud_lora="carried", **flag))


def test_label_mask_range_below_one_is_refused():
    with pytest.raises(ValueError, match="R >= 1"):
        check_method(EdgeConfig.of(model="tiny-llama", noise_label_mask=0.5))
