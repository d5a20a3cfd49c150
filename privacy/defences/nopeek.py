"""A learned defence for the activations the edge sends: NoPeek (Vepakomma et al., "NoPeek: Information leakage
reduction to share activations in distributed deep learning", 2020).

The edge adds `weight` x the distance correlation between what the data is (the input token embeddings) and what
leaves the device (the hidden state after its k blocks) to its training loss, over the batch's real tokens. Its own
trainable weights below the cut (the --peft method's on its blocks) then learn a hidden state that still serves the
task but depends less, by that statistic, on which token it came from. The cloud's frozen blocks do not adapt to the
shifted state in the frozen split; with DLoRA their LoRA does.

Distance correlation (Székely, Rizzo & Bakirov 2007) is 0 only for independent samples and 1 for samples equal up
to a shift, rotation and scale. It is written here from its definition, a few lines, as NoPeek's authors do: torch
has none, and statsmodels' works on NumPy arrays, without gradients. Like noise.py, this is a heuristic with no
privacy guarantee: quote the measured attack recovery (bench/privacy_frontier.py), not the statistic.
"""
from __future__ import annotations

import torch

MAX_TOKENS = 512  # the statistic's cost is quadratic in the tokens; a batch's first 512 real tokens estimate it


def _centred_distances(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sample distance correlation of the rows of `x` [n, p] and `y` [n, q], in [0, 1], differentiable."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"distance correlation needs the same n >= 2 rows in both, got {x.shape[0]} and {y.shape[0]}")
    a, b = _centred_distances(x.double()), _centred_distances(y.double())
    xy, xx, yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (xy.clamp_min(0) / (xx * yy).sqrt().clamp_min(1e-30)).sqrt().to(y.dtype)


def nopeek_term(token_embeds: torch.Tensor, sent: torch.Tensor, attention_mask: torch.Tensor,
                weight: float) -> torch.Tensor:
    """`weight` x the distance correlation between the real tokens' input embeddings [B, T, d] and the hidden state
    sent for them [B, T, d] (the first MAX_TOKENS real tokens), what the edge adds to its loss."""
    real = attention_mask.bool()
    return weight * distance_correlation(token_embeds[real][:MAX_TOKENS].detach(), sent[real][:MAX_TOKENS])
