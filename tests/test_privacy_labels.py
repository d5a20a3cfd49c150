"""The label mask: the gradient the edge sends is scaled per example by a secret factor, divided out on the way back."""
from __future__ import annotations

import math

import pytest
import torch

from edge import remote
from edge.config import EdgeConfig
from edge.methods import check_method
from privacy.defences.labels import mask_factors, per_row
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


def _step(cloud, tiny, monkeypatch, **kw):
    """One training step's (gradient sent to the cloud, edge LoRA gradients by name)."""
    em, _, link = make_edge(cloud, tiny, k=1, m=1, **kw)
    randomize_lora_b(em.lora)
    sent = []
    real_backward = remote._Exchange.backward

    def spy(self, grad_out, carried):
        sent.append(grad_out.detach().clone())
        return real_backward(self, grad_out, carried)

    monkeypatch.setattr(remote._Exchange, "backward", spy)
    loss, _ = em.loss(sst2_batches(1, batch_size=8)[0])
    loss.backward()
    monkeypatch.undo()
    grads = {n: p.grad.detach().clone() for n, p in em.lora.named_parameters() if p.grad is not None}
    link.close()
    return sent[0], grads


def test_masked_gradient_is_scaled_per_example_and_edge_grads_are_unchanged(cloud, tiny, monkeypatch):
    clean_sent, clean_grads = _step(cloud, tiny, monkeypatch)
    sent, grads = _step(cloud, tiny, monkeypatch, noise_label_mask=4.0)
    w = mask_factors(8, 4.0, torch.Generator().manual_seed(0))  # the edge's secret: --seed 0's generator
    torch.testing.assert_close(sent, clean_sent * per_row(w, clean_sent), rtol=1e-5, atol=0)
    assert (w > 0).any() and (w < 0).any()  # some examples' gradient really arrives flipped
    assert not torch.allclose(sent, clean_sent)
    assert grads.keys() == clean_grads.keys() and grads
    for name, g in grads.items():  # the factors divide out: float32 rounding only
        scale = clean_grads[name].abs().max().item()
        torch.testing.assert_close(g, clean_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("mode,why", [("carried", "sums the weight gradients"), ("edge", "branch replies are not masked")])
def test_label_mask_is_refused_where_the_factors_would_not_divide_out(mode, why):
    cfg = EdgeConfig.of(model="tiny-llama", cloud_lora=mode, noise_label_mask=4.0)
    with pytest.raises(ValueError, match=why):
        check_method(cfg)


def test_label_mask_range_below_one_is_refused():
    with pytest.raises(ValueError, match="R >= 1"):
        check_method(EdgeConfig.of(model="tiny-llama", noise_label_mask=0.5))
