"""Defences for the gradients the edge sends, which carry the labels: label-free gradients, and a secret random mask.

The cloud receives dL/d(its output) in every training step, and for a classification loss at the answer position that
gradient depends on the label: privacy/audit/labels.py reads labels back from its norm and direction (Li et al.,
"Label Leakage and Protection in Two-party Split Learning", ICLR 2022). The frozen cloud's backward pass is linear in
that gradient and acts on each example separately. Two defences use this.

Label-free gradients (`--noise-label-free`, two-class tasks). With the two-way loss over the label words'
logits, L_i = BCE(m_i, y_i) with the margin m_i = logit(label word 1) - logit(label word 0), the gradient is
dL/dc_i = s_i * dm_i/dc_i with the scalar s_i = dL_i/dm_i. The edge sends the cloud dm_i/dc_i, the gradient of the
margin, which is the same whatever the example's label (a function of its input and the edge's current weights), and multiplies row i of what comes
back by s_i: the chain rule, exactly. So the gradients the cloud receives carry nothing about the labels that the
hidden state it already holds does not (the label attacks then read the text, not the gradients). The price is an
extra backward through the edge's top blocks, and the training objective is the two-way label-word loss instead of
the full-vocabulary one.

The random mask (`--noise-label-mask R`): the edge multiplies row i of the gradient it sends by a secret w_i, a
random sign times a log-uniform factor in [1/R, R], and divides row i of the input gradient by w_i when it comes
back: its own weights get the gradient they would have got without the mask (up to float rounding), while the cloud
sees norms scaled by |w_i| and half the directions flipped.

The mask hides a gradient's sign and norm, not its line: when the full-vocabulary loss puts mass outside the label
words, the two classes' gradients lie on different lines, and a sign-blind attacker who clusters lines reads the
labels back (privacy/audit/labels.py `label-lines`).

Both apply wherever nothing of the cloud's backward is summed over the batch's examples: the frozen split, and
DLoRA, where the edge computes the cloud blocks' LoRA weight gradients from the per-row gradients of its branch
outputs (it scales those rows to the true gradient for its weights and replies in the cloud's scale). The
weights-carried mode is refused (edge/methods.py check_method): there the cloud sums the carried weights' gradients
over the batch, so a per-example factor could no longer be applied on the edge.

bench/privacy_frontier.py measures what the label attacks still read under each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def margin_loss(label_logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way label-word loss (cross-entropy over the two label words' logits, [B, 2]) and the margins [B] it is
    a function of: logit of label word 1 minus that of label word 0."""
    margin = label_logits[:, 1] - label_logits[:, 0]
    return F.binary_cross_entropy_with_logits(margin.float(), label.to(torch.float32)), margin


def label_free_loss(cloud_out: torch.Tensor, label_logits_of, label: torch.Tensor):
    """(loss, per-example scale, label-free gradient): `label_logits_of(x)` maps the cloud's output x to the label
    words' logits [B, 2] on the edge. The loss's graph starts at a detached copy of `cloud_out`, so backward through it
    trains the edge's top weights; dL/d cloud_out = scale[:, None, ...] * free, with `free` = d(sum of margins)/d
    cloud_out, which does not depend on `label`."""
    seen = cloud_out.detach().requires_grad_(True)
    loss, margin = margin_loss(label_logits_of(seen), label)
    free, = torch.autograd.grad(margin.sum(), seen, retain_graph=True)
    scale, = torch.autograd.grad(loss, margin, retain_graph=True)
    return loss, scale.detach(), free


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
