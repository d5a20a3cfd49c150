"""The words of the text from a summary of it: what the cloud reads from the positions it is sent.

The per-position attacks (tokens.py) guess the token at each private position from that position's state. Where
those states do not leave the edge (privacy/defences/template.py), the template's positions still do, and after k
blocks of attention they summarise the text. This attacker reads the text's words from them: it knows the task's
public template and the cut k (not the edge's LoRA or data), puts public sentences (WikiText-2's training part,
lowercased, cut at sentence ends, the length of short reviews) into the template, runs its copy of the base weights'
first k blocks over the whole prompt as the edge does, keeps the positions the recipe sends, and trains a decoder
from those states to the set of the sentence's tokens: per position a LayerNorm and a two-layer MLP, logits tied
to the frozen input embeddings (as learned.py's decoder), pooled over the positions by logsumexp, and a soft-target
cross-entropy against the sentence's bag of tokens.

Scored as a set: for a row whose text has n tokens the attacker names n distinct tokens (its top n), one guess per
token as the per-position attacks have; `recovered` is the share of the text's distinct tokens among them. `bag-prior`
names the corpus's n most frequent tokens whatever was sent: what an attacker gets without looking, the floor a
figure is read against (function words make it far from 0).
"""
from __future__ import annotations

import random
import re
from collections import Counter

import torch
from torch import nn

import tasks as T
from privacy.audit import inversion as A
from privacy.defences.template import public_positions, template_ids

ATTACKS = ("bag", "bag-prior")


class BagDecoder(nn.Module):
    """States of the positions sent [B, T, H] (mask [B, T]) -> logits over the vocabulary [B, V]: each position's
    logits (tied to the frozen input embeddings), pooled over the positions by logsumexp, so any one position can
    name a token."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        width = embeddings.shape[1]
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.register_buffer("table", embeddings.detach().float().clone())
        self.bias = nn.Parameter(torch.zeros(embeddings.shape[0]))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = mask.bool().nonzero()[:, 0]  # the logits of the positions sent only, [N, V]
        logits = self.mlp(self.norm(h[mask.bool()].float())) @ self.table.T
        top = torch.full((h.shape[0], logits.shape[1]), float("-inf"), device=logits.device)
        top = top.scatter_reduce(0, rows[:, None].expand_as(logits), logits.detach(), "amax")  # for a stable lse
        total = torch.zeros_like(top).index_add(0, rows, (logits - top[rows]).exp())
        return top + total.log() + self.bias


def public_sentences(count: int, seed: int, words: tuple[int, int] = (4, 40)) -> list[str]:
    """Up to `count` lowercased WikiText-2 training sentences of `words` words (<unk> taken out, headings left
    out), in a seeded shuffle."""
    text = " ".join(T.load_split("wikitext2", "train")).replace(" <unk>", "")
    sentences = [s.strip().lower() + " ." for s in re.split(r" \. | \n ", text)]
    keep = [s for s in sentences if words[0] <= len(s.split()) <= words[1] and "=" not in s]
    random.Random(seed).shuffle(keep)
    return keep[:count]


def sent_states(model, tokenizer, task: T.Task, k: int, sentences: list[str], template_only: bool, shadow=None):
    """(states after k blocks [B, T, H], the positions sent [B, T], the text's token ids per row), for public
    `sentences` put into the task's template (its one text field), as the edge would send them: through the base
    weights' k blocks, or a shadow run's (privacy/audit/shadow.py: the recipe's trained blocks, the attacker's own)."""
    if len(task.fields) != 1:
        raise ValueError(f"the bag attack puts one sentence into a one-field template; {task.name}'s has "
                         f"{len(task.fields)} fields")
    items = T.encode(task, [{task.fields[0]: s, "label": 0} for s in sentences], tokenizer)
    batch = T.collate(task, items, getattr(tokenizer, "pad_token_id", 0) or 0)
    real = batch.attention_mask.bool()
    public = public_positions(batch.input_ids, batch.attention_mask, *template_ids(task.template, tokenizer))
    if shadow is not None:
        h = shadow.states(batch.input_ids, batch.attention_mask).float()
    else:
        with torch.no_grad():
            h = A.hidden_after(model, batch.input_ids, batch.attention_mask, [k])[k].float()
    texts = [row[~p & m] for row, p, m in zip(batch.input_ids, public, real)]
    return h, public if template_only else real, texts


def train_bag(model, tokenizer, task: T.Task, k: int, template_only: bool, steps: int = 400, batch: int = 16,
              lr: float = 2e-3, seed: int = 0, log=None, shadow=None) -> tuple[BagDecoder, torch.Tensor]:
    """The trained decoder and the prior (token ids by falling frequency in the public texts); with `shadow`, on
    what the shadow run's k blocks send for them."""
    torch.manual_seed(seed)
    sentences = public_sentences(steps * batch, seed)
    decoder = BagDecoder(model.get_input_embeddings().weight)
    opt = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    counts: Counter = Counter()
    for step in range(steps):
        at = (step * batch) % max(1, len(sentences) - batch + 1)  # epochs over the sentences when they run out
        h, sent, texts = sent_states(model, tokenizer, task, k, sentences[at:at + batch], template_only, shadow)
        target = torch.zeros(len(texts), decoder.table.shape[0])
        for i, t in enumerate(texts):
            ids = t.unique()
            counts.update(ids.tolist())
            target[i, ids] = 1.0 / max(1, len(ids))
        loss = -(target * decoder(h, sent).log_softmax(-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % 100 == 0:
            log(f"bag decoder k={k}: step {step + 1}/{steps}, loss {loss.item():.3f}")
    prior = torch.tensor([t for t, _ in counts.most_common()])
    return decoder.eval(), prior


def set_recovery(guess: list[int], text: torch.Tensor) -> tuple[int, int]:
    """(distinct tokens of `text` among `guess`, distinct tokens of `text`)."""
    truth = set(text.tolist())
    return len(truth & set(guess)), len(truth)


@torch.no_grad()
def bag_attack(decoder: BagDecoder, prior: torch.Tensor, states: list[tuple[torch.Tensor, torch.Tensor]],
               texts: list[list[torch.Tensor]]) -> dict[str, tuple[int, int]]:
    """attack -> (recovered, distinct private tokens) over exchanges' (hidden [B, T, H], mask sent [B, T]) and
    their rows' private token ids; each row gets as many guesses as its text has tokens."""
    totals = {a: [0, 0] for a in ATTACKS}
    for (h, mask), rows in zip(states, texts):
        logits = decoder(h, mask)
        for i, text in enumerate(rows):
            n = int(text.numel())
            if n == 0:
                continue
            for a, guess in (("bag", logits[i].topk(n).indices.tolist()), ("bag-prior", prior[:n].tolist())):
                got, distinct = set_recovery(guess, text)
                totals[a][0] += got
                totals[a][1] += distinct
    return {a: (r, n) for a, (r, n) in totals.items()}


def capture_attack(decoder: BagDecoder, prior: torch.Tensor, exchanges: list, ids: list[torch.Tensor],
                   private: list[torch.Tensor]) -> dict[str, tuple[int, int]]:
    """`bag_attack` on captured exchanges (their `begin.hidden` and the attention mask sent with it), scored against
    each exchange's true input ids [B, T] and private positions [B, T] (privacy/audit/truth.py)."""
    from privacy.audit.tokens import observed
    states = [observed(ex) for ex in exchanges]
    texts = [[row[p] for row, p in zip(i, pv)] for i, pv in zip(ids, private)]
    return bag_attack(decoder, prior, states, texts)


__all__ = ["ATTACKS", "BagDecoder", "bag_attack", "capture_attack", "public_sentences", "sent_states", "set_recovery",
           "train_bag"]
