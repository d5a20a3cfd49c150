"""Labels from the gradients the cloud receives: the norm and cosine attacks of Li et al., "Label Leakage and
Protection in Two-party Split Learning" (ICLR 2022), run on a capture (privacy/audit/capture.py).

A classification task's loss is the cross-entropy of the next-token logits at the answer position, the last real
token of each (right-padded) row (tasks/batching.py). So `output_grad.grad`, dL/d(cloud output), carries the label
at that position, and the cloud finds the position from the attention mask the edge sends with `begin`.

  label-norm    score = |g| / the median |g| of its step (|g| changes as training goes on); split at the median:
                one group per class.
  label-cosine  score = cosine of g to a reference gradient, the first answer gradient of the capture; split at 0.
  label-lines   the adaptive attack on a sign-and-scale mask (privacy/defences/labels.py): blind to each g's sign
                and norm, it takes the two main axes u1, u2 of the lines through the gradients (the top eigenvectors
                of the uncentred second moment of g/|g|) and scores sign(<g,u1> <g,u2>), which no per-example
                factor changes; split at 0. When the two classes' gradients lie on different lines (the
                full-vocabulary loss puts mass outside the label words), that product tells them apart.

Both assume two classes (SST-2, MRPC). A split names no label: which group is which needs one known label. As in
Li et al.'s cosine attack, the attacker is assumed to know the label of one example, the first of the capture (the
reference), and gives its group that label: `balanced_accuracy` (mean recall over the true classes; chance is
50 %). The reference is always in its own group for the cosine attack, not for the norm attack, whose labelling
then comes out reversed when the first example falls on the wrong side of the median. `separation` is the better of
the two labellings: what an attacker gets who knows which group is which (Li et al.'s norm attack assumes it knows
that the class the model gets wrong more often has the larger gradients). The true labels come from the caller;
only the first one reaches the attack.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from privacy.audit.capture import Exchange
from protocol.tensors import decode

ATTACKS = ("label-norm", "label-cosine", "label-lines")


def answer_gradients(exchanges: list[Exchange]) -> list[torch.Tensor]:
    """[B, H] per training exchange: dL/d(cloud output) at each row's last real token, in capture order."""
    out = []
    for ex in exchanges:
        grads = ex.of_kind("output_grad")
        if not grads:
            continue
        mask = decode(ex.begin.attention_mask, out_dtype=torch.bool)
        g = decode(grads[0].grad)
        last = mask.long().sum(1) - 1
        out.append(g[torch.arange(g.shape[0]), last.clamp_min(0)])
    return out


def norm_scores(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.norm(dim=1) / g.norm(dim=1).median().clamp_min(1e-30) for g in grads])


def cosine_scores(grads: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat(grads)
    return F.cosine_similarity(flat, flat[:1].expand_as(flat), dim=1)


def lines_scores(grads: list[torch.Tensor]) -> torch.Tensor:
    unit = F.normalize(torch.cat(grads).double(), dim=1)
    _, vecs = torch.linalg.eigh(unit.T @ unit)  # ascending: the last two are the main axes
    return (unit @ vecs[:, -1]) * (unit @ vecs[:, -2])


def split(scores: torch.Tensor, threshold: float, known_label: int) -> torch.Tensor:
    """Two groups, above and at-or-below `threshold`; the first example's group gets `known_label`."""
    high = scores > threshold
    return torch.where(high == high[0], known_label, 1 - known_label)


def balanced_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    recalls = [(pred[truth == c] == c).float().mean().item() for c in truth.unique().tolist()]
    return sum(recalls) / len(recalls)


@dataclass
class LabelResult:
    attack: str
    examples: int
    predicted: torch.Tensor  # [N] 0/1, the first example's group labelled with its true label
    balanced_accuracy: float | None  # None: no true labels given
    separation: float | None  # the better labelling's balanced accuracy


def label_attack(exchanges: list[Exchange], truth: torch.Tensor | None = None,
                 attacks=ATTACKS) -> list[LabelResult]:
    """Run the label attacks on the training exchanges of one session. `truth` [N]: the labels of the rows of
    every training exchange in order, for scoring (its first entry is the one label the attacker knows; without
    it the first example's group is called 0)."""
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown label attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    grads = answer_gradients(exchanges)
    if not grads:
        return []
    n = sum(g.shape[0] for g in grads)
    if truth is not None and truth.numel() != n:
        raise ValueError(f"{truth.numel()} true labels for the {n} examples of the capture's training steps")
    known = int(truth[0]) if truth is not None else 0
    out = []
    for a in attacks:
        scores = {"label-norm": norm_scores, "label-cosine": cosine_scores, "label-lines": lines_scores}[a](grads)
        pred = split(scores, float(scores.median()) if a == "label-norm" else 0.0, known)
        ba = balanced_accuracy(pred, truth) if truth is not None else None
        out.append(LabelResult(a, n, pred, ba, None if ba is None else max(ba, balanced_accuracy(1 - pred, truth))))
    return out


__all__ = ["ATTACKS", "LabelResult", "answer_gradients", "balanced_accuracy", "label_attack"]
