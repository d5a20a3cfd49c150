"""Tokens from the hidden states in a capture: inversion.py's dictionary and in-context attacks and learned.py's
trained decoder (`learned`, adaptive to the defence's noise when given its recipe) on `begin.hidden`.

Each exchange's `begin` holds what the edge sent after its first k blocks ([B, T, H]) and the attention mask. The
attacker runs the attacks of privacy/audit/inversion.py on it with its own copy of the base weights. Which
positions hold the data owner's text the capture cannot tell; the caller may say (`private`, e.g. the review inside
the SST-2 prompt, the template being public), else every real (non-pad) position counts.

Two figures per attack: `recovered`, the guesses equal to the true tokens (only when the caller gives them), and
`confirmed`, the guesses the attacker can check alone: it runs the k blocks on its guessed sequence and a position
counts when the hidden state it gets is within `tolerance` (relative L2) of the one observed. A confirmed guess
reproduces the observed state; a right guess after a wrong one (other context) or under a LoRA the edge trained on
its own blocks may fail the check, and noise on the hidden state (0.1 x its RMS in the tests) fails it almost
everywhere: `confirmed` alone can understate what the attacker read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from privacy.audit import inversion as A
from privacy.audit.capture import Exchange
from protocol.tensors import decode

ATTACKS = ("dictionary", "in-context", "learned")


def observed(ex: Exchange) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [B, T, H] float32, attention mask [B, T] long) of an exchange's begin."""
    return decode(ex.begin.hidden), decode(ex.begin.attention_mask, out_dtype=torch.bool).long()


@dataclass
class TokenResult:
    attack: str
    positions: int  # positions attacked (private ones, or every real one)
    confirmed: int
    recovered: int | None  # None: no true tokens given
    private_known: bool  # False: every real position counted

    @property
    def confirmed_rate(self) -> float:
        return self.confirmed / max(self.positions, 1)

    @property
    def rate(self) -> float | None:
        return None if self.recovered is None else self.recovered / max(self.positions, 1)


@torch.no_grad()
def guesses(attacker, dictionary: A.Dictionary | None, probe: A.Probe, h: torch.Tensor, k: int, attacks,
            candidates: int = 4, rounds: int = 1, inverter=None) -> dict[str, torch.Tensor]:
    """attack -> guessed token per private position of `probe` (in `probe.private` order)."""
    out = {}
    if "dictionary" in attacks or "in-context" in attacks:
        short = dictionary.vocab[A.nearest(h[probe.private], dictionary.table[k], topk=candidates)]
        out["dictionary"] = short[:, 0]
        if "in-context" in attacks:
            out["in-context"] = A.in_context_attack(attacker, probe, h, k, short, rounds)
    if "learned" in attacks:
        out["learned"] = inverter.predict(h[probe.private])
    return {a: out[a] for a in attacks}


@torch.no_grad()
def confirmed(attacker, probe: A.Probe, h: torch.Tensor, k: int, guess: torch.Tensor,
              tolerance: float) -> torch.Tensor:
    """[n_private] bool: the guessed sequence (known tokens elsewhere) reproduces the observed state there."""
    ids = probe.input_ids.clone()
    ids[probe.private] = guess
    again = A.hidden_after(attacker, ids, probe.attention_mask, [k])[k].float()
    seen = h[probe.private]
    return (again[probe.private] - seen).norm(dim=-1) <= tolerance * seen.norm(dim=-1).clamp_min(1e-30)


def token_attack(attacker, exchanges: list[Exchange], k: int, dictionary: A.Dictionary | None, attacks=ATTACKS,
                 truth: list[torch.Tensor] | None = None, private: list[torch.Tensor] | None = None,
                 candidates: int = 4, rounds: int = 1, tolerance: float = 1e-2, inverter=None) -> list[TokenResult]:
    """Attack every exchange's begin.hidden (after k edge blocks). `truth`: the true input ids per exchange
    ([B, T]); `private`: the private positions per exchange ([B, T] bool; default: every real position), with
    `truth` (the attacker is given the public tokens around them). `inverter`: learned.py's trained decoder, for
    the `learned` attack."""
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown token attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    if private is not None and truth is None:
        raise ValueError("private positions need the true tokens too (the public ones around them come from there)")
    if "learned" in attacks and inverter is None:
        raise ValueError("the learned attack needs a trained inverter (privacy/audit/learned.py train_inverter)")
    totals = {a: [0, 0, 0] for a in attacks}  # positions, confirmed, recovered
    for i, ex in enumerate(exchanges):
        h, mask = observed(ex)
        ids = truth[i] if truth is not None else torch.zeros_like(mask)
        probe = A.Probe(ids, mask, private[i] & mask.bool() if private is not None else mask.bool())
        for a, g in guesses(attacker, dictionary, probe, h, k, attacks, candidates, rounds, inverter).items():
            t = totals[a]
            t[0] += probe.n_private
            t[1] += int(confirmed(attacker, probe, h, k, g, tolerance).sum())
            t[2] += int((g == ids[probe.private]).sum())
    return [TokenResult(a, n, c, r if truth is not None else None, private is not None)
            for a, (n, c, r) in totals.items()]


__all__ = ["ATTACKS", "TokenResult", "confirmed", "guesses", "observed", "token_attack"]
