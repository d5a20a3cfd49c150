"""--noise-nopeek: the edge adds weight x the distance correlation between the input token embeddings and the hidden
state it sends to its loss (privacy/defences/nopeek.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.config import EdgeConfig
from edge.methods import check_method
from privacy.defences.nopeek import MAX_TOKENS, distance_correlation, nopeek_term
from tests.conftest import make_edge, randomize_lora_b, sst2_batches


def _reference_dcor(x: np.ndarray, y: np.ndarray) -> float:
    """Székely, Rizzo & Bakirov's sample statistic, written out in NumPy."""
    def centred(z):
        d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
        return d - d.mean(0)[None, :] - d.mean(1)[:, None] + d.mean()
    a, b = centred(x), centred(y)
    return float(np.sqrt((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())))


def test_distance_correlation_is_the_sample_statistic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :5] @ torch.randn(5, 7, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        60, 7, generator=g, dtype=torch.float64)
    assert distance_correlation(x, y).item() == pytest.approx(_reference_dcor(x.numpy(), y.numpy()), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert distance_correlation(x, 3 * x @ q + 2).item() == pytest.approx(1.0, abs=1e-9)  # shift, rotation, scale
    independent = distance_correlation(x, torch.randn(60, 7, generator=g, dtype=torch.float64)).item()
    assert independent < distance_correlation(x, y).item()
    with pytest.raises(ValueError, match="same n >= 2 rows"):
        distance_correlation(x, y[:59])


def test_the_term_counts_real_tokens_only_and_trains_only_what_is_sent():
    g = torch.Generator().manual_seed(1)
    tokens, sent = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    term = nopeek_term(tokens.requires_grad_(True), sent, mask, 0.25)
    real = mask.bool()
    assert term.item() == pytest.approx(0.25 * _reference_dcor(tokens[real].detach().numpy(),
                                                               sent[real].detach().numpy()), rel=1e-5)
    term.backward()
    assert tokens.grad is None and sent.grad[~real].abs().max() == 0 and sent.grad[real].abs().max() > 0


def test_the_edge_adds_the_term_to_its_loss_and_sends_the_same_state(cloud, tiny, monkeypatch):
    """With --noise-nopeek 0.5 the training loss is the task's loss + 0.5 x dCor(token embeddings, the state sent),
    the cloud gets the same hidden state as without, and the bottom's LoRA gets the term's gradient; evaluation
    (no gradient) adds nothing."""
    em, _, link = make_edge(cloud, tiny, k=1, m=1, noise_nopeek=0.5)
    randomize_lora_b(em.lora)
    batch = sst2_batches(1, batch_size=8)[0]
    sent = []
    real_forward = type(em.cloud).forward

    def spy(self, hidden, mask, *rest):
        sent.append(hidden.detach().clone())
        return real_forward(self, hidden, mask, *rest)
    monkeypatch.setattr(type(em.cloud), "forward", spy)

    def step(weight):
        em.nopeek = weight
        for p in em.lora.parameters():
            p.grad = None
        loss = em.loss(batch)[0]
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in em.lora.named_parameters() if p.grad is not None}
    with_term, grads_with = step(0.5)
    without, grads_without = step(0.0)
    real = batch.attention_mask.bool()
    assert real.sum() > MAX_TOKENS  # the term estimates dCor on the first MAX_TOKENS real tokens
    tokens = em.bottom.token_embeds(batch.input_ids)[real][:MAX_TOKENS]
    expected = 0.5 * distance_correlation(tokens, sent[1][real][:MAX_TOKENS])
    assert with_term - without == pytest.approx(expected.item(), rel=1e-4)
    assert torch.equal(sent[0], sent[1])
    assert any(not torch.allclose(grads_with[n], grads_without[n]) for n in grads_with)
    em.nopeek = 0.5
    with torch.no_grad():
        em.hidden(batch)
    assert em.privacy_term is None
    link.close()


def test_a_negative_weight_is_refused():
    check_method(EdgeConfig.of(model="tiny-llama", noise_nopeek=0.1))
    with pytest.raises(ValueError, match=r"^--noise-nopeek is a weight >= 0 \(0: off\), got -1.0$"):
        check_method(EdgeConfig.of(model="tiny-llama", noise_nopeek=-1.0))
