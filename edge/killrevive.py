"""Kill & Revive (DLoRA, Gao & Zhang 2024): keep only the cloud-block LoRA modules that are still learning active.

A killed module costs nothing: the cloud skips its site (no LoRA input or output crosses the wire, no edge compute),
and its weights stay as they are and stay in the saved adapter. The policy, with every threshold an option:

  score(block)  = EMA over steps, measured while the block is active, of its `signal`:
                  "update"  ||update of the block's LoRA weights|| / ||weights|| (the paper's wording; default)
                  "grad"    ||gradient of the block's LoRA weights|| at the last step (under Adam every active weight
                            moves by about lr per step, so the gradient says how much loss a module can still remove)
                On SmolLM2 / SST-2 (160 steps, batch 8, both at ~0.40 of all-active bytes) "update" kept 88.2 % dev
                accuracy and "grad" 86.8 %; `bench/dlora_bytes.py` runs both.
  kill          after `warmup` steps, every step: active blocks whose score is below `threshold` x the mean score of
                the active blocks are killed, lowest first, while more than `min_active` of the blocks stay active
  revive        every `revive_every` steps all killed blocks come back for `probe_steps` steps so their scores are
                measured afresh (a module that started to matter again stays); and all come back at once when the
                (slow) loss EMA rises `loss_rise` above its best (the signal that killed modules are missed)

Hand-written because no library implements DLoRA's policy; it is ~60 lines of bookkeeping over LoRA weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class KRConfig:
    enabled: bool = field(default=False, metadata={"flag": "kr"})  # DLoRA Kill & Revive of cloud-block LoRA modules
    signal: Literal["update", "grad"] = "update"  # what a block's score measures: relative update or gradient norm
    warmup: int = 10  # steps before any module is killed
    threshold: float = 1.0  # kill active modules scoring below this x the mean score of the active ones
    min_active: float = 0.3  # fraction of cloud blocks that always stays active
    revive_every: int = 25  # steps between revivals of every killed module (to measure them afresh)
    probe_steps: int = 2  # steps a revived module stays active before it may be killed again
    loss_rise: float = 0.20  # relative rise of the loss EMA over its best that revives everything
    ema: float = 0.7  # smoothing of the per-block update scores
    loss_ema: float = 0.95  # smoothing of the loss: a batch-8 loss is noisy, the signal must not fire on noise


@dataclass
class KillRevive:
    blocks: list[int]
    cfg: KRConfig = field(default_factory=KRConfig)
    score: dict[int, float] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)
    history: list[list[int]] = field(default_factory=list)  # active blocks at each step
    _prev: dict[int, torch.Tensor] = field(default_factory=dict)
    _loss_ema: float | None = None
    _best: float = float("inf")
    _probe_until: int = -1

    def __post_init__(self):
        if self.cfg.signal not in ("grad", "update"):
            raise ValueError(f"Kill & Revive signal must be 'grad' or 'update', not {self.cfg.signal!r}")

    def _params(self, lora, b: int) -> list[torch.Tensor]:
        return [p for t in lora.cfg.targets for p in lora.site(b, t).parameters()]

    def _grad_norm(self, lora, b: int) -> float | None:
        """||gradient|| of the block's LoRA weights from the last step; None before its first step."""
        grads = [p.grad for p in self._params(lora, b) if p.grad is not None]
        return torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item() if grads else None

    def _update_ratio(self, lora, b: int) -> float | None:
        """||change since this block was last seen|| / ||weights||; None the first time."""
        now = torch.cat([p.detach().flatten() for p in self._params(lora, b)])
        prev, self._prev[b] = self._prev.get(b), now
        return None if prev is None else ((now - prev).norm() / (now.norm() + 1e-12)).item()

    def before_step(self, em, step: int, last_loss: float | None = None) -> set[int]:
        """Update scores from the last step's updates, decide who is killed this step, tell the RemoteCloud."""
        c = self.cfg
        for b in self.blocks:
            if b in self.killed:
                continue
            value = self._grad_norm(em.lora, b) if c.signal == "grad" else self._update_ratio(em.lora, b)
            if value is not None:
                self.score[b] = value if b not in self.score else c.ema * self.score[b] + (1 - c.ema) * value
        if last_loss is not None:
            self._loss_ema = (last_loss if self._loss_ema is None
                              else c.loss_ema * self._loss_ema + (1 - c.loss_ema) * last_loss)
            self._best = min(self._best, self._loss_ema)
        loss_signal = self._loss_ema is not None and self._loss_ema > self._best * (1 + c.loss_rise)
        if self.killed and (loss_signal or (step >= c.warmup and step % c.revive_every == 0)):
            self.killed.clear()  # revive: measure everyone again
            self._probe_until = step + c.probe_steps
            if loss_signal:
                self._best = self._loss_ema
        elif step >= c.warmup and step >= self._probe_until:
            active = [b for b in self.blocks if b not in self.killed and b in self.score]
            if active:
                mean = sum(self.score[b] for b in active) / len(active)
                floor = max(1, int(round(c.min_active * len(self.blocks))))
                for b in sorted(active, key=lambda b: self.score[b]):
                    if len(self.blocks) - len(self.killed) <= floor or self.score[b] >= c.threshold * mean:
                        break
                    self.killed.add(b)
        em.cloud.killed = set(self.killed)
        self.history.append([b for b in self.blocks if b not in self.killed])
        return self.killed

    def active_fraction(self) -> float:
        return sum(len(h) for h in self.history) / max(1, len(self.history) * len(self.blocks))
