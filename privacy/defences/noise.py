"""A defence for the activations the edge sends: clip each token's hidden vector, then add Gaussian noise.

Split training sends the hidden state after the edge's first k blocks to the cloud, and that state is easy to
invert: a cloud that runs the same k blocks over the vocabulary reads most tokens back (privacy/audit/inversion.py). Clipping bounds how far any single token vector reaches; Gaussian noise on top
blurs it. bench/privacy_audit.py measures how much this helps: on SmolLM2 the attack barely notices sigma = 1x the
RMS of the hidden state at k <= 2, and only noise several times larger than the signal brings it down, so check the
task's accuracy at the sigma you pick.

This is a HEURISTIC, not differential privacy: clip + Gaussian noise is the shape of the Gaussian mechanism, but no
(epsilon, delta) follows from it here. Every token of a sentence is sent, tokens are correlated through attention,
each example is sent again every epoch, and the backward pass sends gradients back. Do not quote a privacy budget
from these settings; quote the measured attack recovery rates instead.
"""
from __future__ import annotations

import torch


def clip_rows(hidden: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale down every vector along the last dimension whose L2 norm exceeds `max_norm` to exactly `max_norm`."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norms = hidden.norm(dim=-1, keepdim=True)
    return hidden * (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)


def add_gaussian_noise(hidden: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`hidden` + N(0, sigma^2) per element (sigma absolute: see `rms` to set it relative to the signal)."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return hidden
    device = generator.device if generator is not None else hidden.device  # draw where the generator lives
    noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32, device=device)
    return hidden + (sigma * noise).to(hidden)


def rms(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Root-mean-square of the hidden state's elements over real tokens (padding excluded), to scale sigma by."""
    h = hidden.float()
    if attention_mask is not None:
        h = h[attention_mask.bool()]
    return h.pow(2).mean().sqrt().item()


def protect(hidden: torch.Tensor, max_norm: float | None, sigma: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip (when `max_norm` is given) then noise: what the edge applies just before encoding the tensor."""
    if max_norm is not None:
        hidden = clip_rows(hidden, max_norm)
    return add_gaussian_noise(hidden, sigma, generator)


def protect_relative(hidden: torch.Tensor, attention_mask: torch.Tensor | None, max_norm: float | None,
                     sigma_rel: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The edge's --noise-clip / --noise-sigma: clip (when `max_norm` is given), then noise whose sigma is `sigma_rel`
    x the clipped state's RMS over real tokens. The learned attacker (privacy/audit/learned.py) noises its public
    states with the same function."""
    if max_norm is not None:
        hidden = clip_rows(hidden, max_norm)
    if sigma_rel > 0:
        hidden = add_gaussian_noise(hidden, sigma_rel * rms(hidden.detach(), attention_mask), generator)
    return hidden
