"""A defence for the gradients the edge sends: multiply each example's dL/d(cloud output) by a secret random factor.

The cloud receives dL/d(its output) in every training step, and for a classification loss at the answer position that
gradient depends on the label: privacy/audit/labels.py reads labels back from its norm and direction (Li et al.,
"Label Leakage and Protection in Two-party Split Learning", ICLR 2022). The frozen cloud's backward pass is linear in
that gradient and acts on each example separately (the blocks hold no trainable weights and nothing mixes examples
across the batch), so the edge may send row i scaled by a secret w_i and divide the input gradient's row i by w_i
when it comes back: the edge's own weights get exactly the gradient they would have got without the mask (up to
float rounding), while the cloud sees gradients whose norm is scaled by |w_i| in [1/R, R] and whose direction is
flipped for half the examples.

Where the factor does NOT cancel, the option is refused (edge/methods.py check_method):
- the weights-carried mode: the cloud sums the carried weights' gradients over the batch's examples, so a per-example
  factor could no longer be divided out on the edge;
- DLoRA: the edge computes the cloud LoRA's weight gradients from the gradients its branch replies receive, and those
  replies would need the same masking first; not built yet.

This is a HEURISTIC, not a guarantee: the attacker sees the masked gradients of every step, and the sign flip hides
a direction only while the factors stay secret. bench/privacy_audit.py measures what the label attacks still read.
"""
from __future__ import annotations

import math

import torch


def mask_factors(n: int, scale_range: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` secret factors, float64: a random sign times exp(U(-ln R, ln R)), so |w| lies in [1/R, R] log-uniformly."""
    if scale_range < 1:
        raise ValueError(f"scale_range must be >= 1, got {scale_range}")
    sign = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    log_r = math.log(scale_range)
    magnitude = torch.exp((torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * log_r)
    return sign * magnitude


def per_row(factors: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`factors` shaped to multiply `like` row by row (batch first), in `like`'s dtype and on its device."""
    return factors.to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))
