"""Clipping and noising activations before they leave the edge."""
from __future__ import annotations

import pytest
import torch

from privacy.defences.noise import add_gaussian_noise, clip_rows, protect, rms


def test_clip_rows_caps_norms_and_keeps_directions():
    h = torch.tensor([[[3.0, 4.0], [0.3, 0.4]], [[0.0, 0.0], [6.0, 8.0]]])
    out = clip_rows(h, 1.0)
    torch.testing.assert_close(out.norm(dim=-1), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(out[0, 0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(out[0, 1], h[0, 1])  # under the cap: untouched
    with pytest.raises(ValueError):
        clip_rows(h, 0.0)


def test_noise_has_the_asked_scale_and_is_reproducible():
    h = torch.zeros(64, 32, 48)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = add_gaussian_noise(h, 0.5, g1), add_gaussian_noise(h, 0.5, g2)
    torch.testing.assert_close(a, b)
    assert abs(a.std().item() - 0.5) < 0.01 and abs(a.mean().item()) < 0.01
    assert add_gaussian_noise(h, 0.0) is h
    with pytest.raises(ValueError):
        add_gaussian_noise(h, -1.0)


def test_noise_keeps_dtype():
    h = torch.ones(4, 8, dtype=torch.bfloat16)
    assert add_gaussian_noise(h, 0.1, torch.Generator().manual_seed(0)).dtype == torch.bfloat16


def test_rms_ignores_padding():
    h = torch.tensor([[[2.0, 2.0], [100.0, 100.0]]])
    assert rms(h, torch.tensor([[1, 0]])) == pytest.approx(2.0)
    assert rms(h) == pytest.approx((10004 / 2) ** 0.5)


def test_protect_clips_then_noises():
    h = torch.full((1000, 16), 10.0)
    out = protect(h, max_norm=4.0, sigma=0.0)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((1000,), 4.0))
    noisy = protect(h, max_norm=4.0, sigma=0.1, generator=torch.Generator().manual_seed(0))
    assert abs((noisy - out).std().item() - 0.1) < 0.005


def test_edge_sends_clipped_noised_hidden_and_still_trains(cloud, tiny, monkeypatch):
    """`noise_sigma` / `noise_clip` on the edge: what reaches the cloud is the bottom's output clipped and noised
    (sigma relative to its RMS over real tokens); gradients flow through the clip, and training goes on."""
    from tests.conftest import make_edge, sst2_batches
    em, _, link = make_edge(cloud, tiny, noise_sigma=0.5, noise_clip=0.18)
    sent, clean = [], []
    real_forward = type(em.cloud).forward

    def spy(self, hidden, mask, *rest):  # what the RemoteCloud is about to encode and send
        sent.append(hidden.detach())
        return real_forward(self, hidden, mask, *rest)

    monkeypatch.setattr(type(em.cloud), "forward", spy)
    batch = sst2_batches(1)[0]
    with torch.no_grad():
        clean.append(em.bottom(batch.input_ids, batch.attention_mask))
    loss, _ = em.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in em.lora.parameters())
    real = batch.attention_mask.bool()
    clipped = clip_rows(clean[0], 0.18)
    noise = (sent[0] - clipped)[real]
    sigma = 0.5 * rms(clipped, batch.attention_mask)
    assert abs(noise.std().item() / sigma - 1) < 0.1  # the asked scale, relative to the clipped signal
    assert clean[0][real].norm(dim=-1).max() > 0.18  # clipping had work to do
    link.close()
