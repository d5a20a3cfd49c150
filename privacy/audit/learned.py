"""A learned inversion model: tokens from the hidden state by a decoder the attacker trains on public text.

The attacker runs public text (WikiText-2's training lines, `../shared/data`) through its copy of the base weights'
first k blocks and trains a small decoder from the hidden state at each position to the token there: a LayerNorm
(the massive-activation dimensions of Llama-style states would swamp the rest), a two-layer MLP, and logits against
the base model's own input-embedding table (frozen; one bias per token), so the decoder has ~2 H^2 weights instead of
H x V. It never sees the victim's data or the edge's private LoRA.

Adaptive: given the defence's recipe and its settings (`sigma`, `clip`: privacy/defences/noise.py, as the edge
applies them: clip each token's vector, then Gaussian noise of sigma x the RMS over real tokens), the attacker
noises its own public states with the same function (noise.py protect_relative), fresh noise every step, so the decoder learns to read through it.
With a shadow run (privacy/audit/shadow.py: the recipe run by the attacker on public data of the task) the decoder
trains on what the shadow's own trained k blocks send for its public examples: the attacker who adapts to a learned
defence (--noise-nopeek) as well as to noise.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

import tasks as T
from privacy.audit import inversion as A
from privacy.defences.noise import protect_relative


class Inverter(nn.Module):
    """h_k [N, H] -> logits over the vocabulary [N, V], tied to the frozen input embeddings."""

    def __init__(self, embeddings: torch.Tensor, hidden: int | None = None):
        super().__init__()
        width = embeddings.shape[1]
        hidden = hidden or 2 * width
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.register_buffer("table", embeddings.detach().float().clone())
        self.bias = nn.Parameter(torch.zeros(embeddings.shape[0]))

    def forward(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the vocabulary, or over `tokens` only (sampled softmax in training)."""
        f = self.mlp(self.norm(h.float()))
        return f @ self.table.T + self.bias if tokens is None else f @ self.table[tokens].T + self.bias[tokens]

    @torch.no_grad()
    def predict(self, h: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        return torch.cat([self(part).argmax(-1) for part in h.split(chunk)]) if len(h) else h.new_zeros(0).long()


@dataclass
class InverterSettings:
    steps: int = 400  # optimizer steps
    batch: int = 8  # public windows per step
    length: int = 64  # tokens per window
    lr: float = 2e-3
    negatives: int = 4096  # sampled-softmax negatives per step
    sigma: float = 0.0  # the defence's noise, x the RMS of what is sent (0: none)
    clip: float | None = None  # the defence's per-token clip (None: none)
    seed: int = 0


def public_windows(tokenizer, length: int, count: int, seed: int) -> list[list[int]]:
    """`count` token windows of WikiText-2's training lines (fewer if it runs out), from a seeded start, in order;
    the lines are tokenized only as far as needed."""
    task = T.Task("wikitext2", "lm", max_len=length - 1)
    lines = T.load_split("wikitext2", "train")
    at = random.Random(seed).randrange(max(1, len(lines) // 2))
    windows: list[list[int]] = []
    while len(windows) < count and at < len(lines):
        windows += [item["ids"] for item in T.encode(task, lines[at:at + 200], tokenizer)]
        at += 200
    return windows[:count]


def public_states(model, tokenizer, k: int, s: InverterSettings, shadow=None):
    """(h_k, ids, mask) for each of the inverter's s.steps steps, of public text: WikiText-2 windows through the base
    weights' first k blocks, or with `shadow` (privacy/audit/shadow.py) the shadow run's public examples through its
    own k blocks (the attacker's stand-in for the edge's private weights)."""
    if shadow is not None:
        for ids, mask in shadow.batches(s.batch, s.steps, s.seed):
            yield shadow.states(ids, mask).float(), ids, mask
        return
    windows = public_windows(tokenizer, s.length, s.steps * s.batch, s.seed)
    if not windows:
        raise ValueError("no public WikiText-2 window to train the inverter on")
    chunk = 8 * s.batch  # windows run through the k blocks at once, then taken a batch at a time
    for first in range(0, s.steps, 8):
        at = (first * s.batch) % max(1, len(windows) - chunk + 1)
        ids = torch.tensor(windows[at:at + chunk])
        with torch.no_grad():
            h = A.hidden_after(model, ids, torch.ones_like(ids), [k])[k].float()
        for part_h, part_ids in list(zip(h.split(s.batch), ids.split(s.batch)))[:s.steps - first]:
            yield part_h, part_ids, torch.ones_like(part_ids)


def train_inverter(model, tokenizer, k: int, settings: InverterSettings | None = None, log=None,
                   shadow=None) -> Inverter:
    """Train the decoder on public text through the base weights' first k blocks, or a shadow run's (under the
    defence's recipe)."""
    s = settings or InverterSettings()
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    inverter = Inverter(model.get_input_embeddings().weight)
    vocab = inverter.table.shape[0]
    opt = torch.optim.AdamW([p for p in inverter.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0)
    for step, (h, ids, mask) in enumerate(public_states(model, tokenizer, k, s, shadow)):
        h = protect_relative(h, mask, s.clip, s.sigma, g)  # the edge's recipe, fresh noise every step
        scored = mask.bool().clone()
        scored[:, 0] = False  # not position 0, the attention sink
        target = ids[scored]
        # sampled softmax: the batch's tokens and `negatives` uniform others (the full vocabulary's logits for every
        # position would cost most of the training; prediction uses all of them)
        tokens = torch.unique(torch.cat([target, torch.randint(0, vocab, (s.negatives,), generator=g)]))
        loss = nn.functional.cross_entropy(inverter(h[scored], tokens), torch.searchsorted(tokens, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % 100 == 0:
            log(f"inverter k={k} sigma={s.sigma:g}{' (shadow)' if shadow else ''}: step {step + 1}/{s.steps}, "
                f"loss {loss.item():.3f}")
    return inverter.eval()


__all__ = ["Inverter", "InverterSettings", "public_states", "public_windows", "train_inverter"]
