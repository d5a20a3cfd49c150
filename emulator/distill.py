"""Distil the emulator toward the full middle on public text (WikiText-2), on the cloud, before the bundle ships.

The bottom adapter's output h goes into both the full middle (teacher) and the emulator (student); the emulator's
blocks (only those) learn to give

    the same hidden states   e(h) ≈ t(h)                         (the paper's squared error; `relative_error`)
    and, with a gradient weight w > 0, the same gradients downward:
                             J_e(h)ᵀ g ≈ J_t(h)ᵀ g                 (Jacobian matching)

where g is the full model's LM-loss gradient at the middle's output on the same text. The second term is Jacobian
matching (Srinivas & Fleuret, "Knowledge Transfer with Jacobian Matching", ICML 2018; Sobolev training, Czarnecki et
al. 2017) aimed at what offsite tuning uses the emulator for: the bottom adapter learns only from the gradients the
emulator passes down (`build.gradient_alignment` measures how far they point from the full model's). It costs a
teacher forward and backward through the whole model per batch and a double backward through the emulator.
Measured on SmolLM2 (README, 200 steps, mean of three seeds): both errors fall and the emulator-tuned model gains,
the plug-in does not (MLP keep 0.25: 73.3 against 73.6 %; layer drop 0.6: 57.3 against 59.5 %), so it is off by
default.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import tasks as T
from emulator.bundle import Layout
from model.segments import BlockRun, family_of
from model.training import FitOptions, endless_batches, fit

if TYPE_CHECKING:
    from emulator.build import BuildConfig


def wikitext_items(tokenizer, split: str, seq: int) -> list[dict]:
    """Public text for distillation: WikiText-2 in windows of `seq` tokens."""
    task = dataclasses.replace(T.TASKS["wikitext2"], max_len=seq)
    return T.encode(task, T.load_split("wikitext2", split), tokenizer)


def wikitext_batches(tokenizer, cfg: BuildConfig, split: str, count: int) -> list[T.Batch]:
    """The first `count` WikiText-2 batches of `split` (cfg.distill_batch windows of cfg.distill_seq tokens)."""
    pad = getattr(tokenizer, "pad_token_id", 0) or 0
    items = wikitext_items(tokenizer, split, cfg.distill_seq)
    return [b for b, _ in zip(T.batches(T.TASKS["wikitext2"], items, cfg.distill_batch, pad), range(count))]


def dev_batches(tokenizer, cfg: BuildConfig) -> list[T.Batch]:
    """The held-out WikiText-2 batches the emulator's error and quality are measured on."""
    return wikitext_batches(tokenizer, cfg, "dev", cfg.distill_eval_batches)


def relative_error(got: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's squared error taken relative to the target's size, plus the same per token.

    Llama-style models put "massive activations" on the first token (SmolLM2: from block 11 on, its hidden
    state is ~150x larger in RMS than any other token's), and the top blocks depend on it as an attention
    sink. The batch-relative error (= plain MSE up to a constant) is almost all that token, so it teaches the
    emulator to make the sink; the per-token relative error gives every other token the same say."""
    err = (got - target).pow(2).sum(-1)
    size = target.pow(2).sum(-1)
    m = mask.to(err.dtype)
    whole = (err * m).sum() / (size * m).sum()
    per_token = (err / size.clamp_min(1e-6) * m).sum() / m.sum()
    return whole + per_token


class MiddlePair:
    """The full model's middle (teacher) and the emulator (student), fed the same bottom-adapter output."""

    def __init__(self, full, emu, layout: Layout, cache: dict | None = None, gradient_weight: float = 0.0):
        self.full, self.layout, self.gradient_weight = full, layout, gradient_weight
        first, last = len(layout.bottom), layout.num_layers - len(layout.top)
        self.student = BlockRun(emu, range(first, first + len(layout.emulator)))
        self.teacher_middle = BlockRun(full, range(first, last))
        self.teacher_top = BlockRun(full, range(last, layout.num_layers))
        self.cache = cache  # teacher targets by batch, shared by emulators of the same adapter (a size sweep)

    @torch.no_grad()
    def inputs_and_targets(self, batch: T.Batch) -> tuple[torch.Tensor, ...]:
        """(bottom adapter output h, full middle output t), read off one forward pass of the full model; with a
        gradient weight also (g at the middle's output, Jᵀg at its input), both scaled by one number so that their
        per-token size is about 1 (the relation between them is linear, so it holds as it is)."""
        key = (len(self.layout.bottom), len(self.layout.top), self.gradient_weight > 0,
               batch.input_ids.numpy().tobytes(), batch.attention_mask.numpy().tobytes())
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        states = self.full.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                                      output_hidden_states=True).hidden_states  # states[i] = input of block i
        got = states[len(self.layout.bottom)], states[self.layout.num_layers - len(self.layout.top)]
        if self.gradient_weight > 0:
            got = got + self.teacher_gradients(batch, got[0])
        if self.cache is not None:
            self.cache[key] = got
        return got

    def teacher_gradients(self, batch: T.Batch, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            out = self.teacher_middle(h, batch.attention_mask)
            top = family_of(self.full).final_norm(self.full)(self.teacher_top(out, batch.attention_mask))
            loss, _ = T.loss_from_hidden(T.TASKS["wikitext2"], top, batch, self.full.get_output_embeddings())
            g_in, g_out = torch.autograd.grad(loss, [h, out])
        m = batch.attention_mask.to(g_in.dtype)
        scale = ((g_in.pow(2).sum(-1) * m).sum() / m.sum()).sqrt().clamp_min(1e-30)
        return g_out / scale, g_in / scale

    def loss(self, targets: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
        """`relative_error` of the states, plus gradient_weight × that of the gradients passed down."""
        h, t = targets[:2]
        if self.gradient_weight <= 0:
            return relative_error(self.student(h, mask), t, mask)
        return self.state_and_gradient_errors(targets, mask, create_graph=True)[0]

    def state_and_gradient_errors(self, targets: tuple[torch.Tensor, ...], mask: torch.Tensor,
                                  create_graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, state error, gradient error) of the emulator as it is now."""
        h, t, g_out, g_in = targets
        # PyTorch's fused CPU attention has no double backward; its math form (the same function) has one.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            h = h.detach().requires_grad_(True)
            e = self.student(h, mask)
            (passed,) = torch.autograd.grad(e, h, grad_outputs=g_out, create_graph=create_graph)
        states, grads = relative_error(e, t, mask), relative_error(passed, g_in, mask)
        return states + self.gradient_weight * grads, states, grads


def held_out_errors(pair: MiddlePair, batches: list[T.Batch]) -> dict[str, float]:
    """The emulator's state error (`relative_error`) averaged over `batches`, and with a gradient weight its gradient
    error too."""
    states, grads = [], []
    for b in batches:
        targets = pair.inputs_and_targets(b)
        if pair.gradient_weight > 0:
            _, s, g = pair.state_and_gradient_errors(targets, b.attention_mask, create_graph=False)
            grads.append(g.item())
        else:
            with torch.no_grad():
                s = relative_error(pair.student(targets[0], b.attention_mask), targets[1], b.attention_mask)
        states.append(s.item())
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return {"states": mean(states), **({"gradients": mean(grads)} if grads else {})}


def held_out_error(pair: MiddlePair, batches: list[T.Batch]) -> float:
    """The state error of the emulator as it is now, averaged over `batches` (the manifest's distillation error)."""
    return held_out_errors(pair, batches)["states"]


def distill(full, emu, layout: Layout, tokenizer, cfg: BuildConfig, teacher_cache: dict | None = None) -> dict:
    """Train the emulator's blocks (only those) on `MiddlePair.loss` over WikiText-2 (`fit`; the held-out errors are
    regression errors, not task scores, so they are measured here). `teacher_cache` (a dict) keeps the full model's
    targets per batch for the next emulator distilled with it."""
    torch.manual_seed(cfg.seed)
    pair = MiddlePair(full, emu, layout, teacher_cache, cfg.distill_gradient_weight)
    params = [p for p in pair.student.parameters()]
    for p in emu.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    pad = getattr(tokenizer, "pad_token_id", 0) or 0
    train = wikitext_items(tokenizer, "train", cfg.distill_seq)
    held_out = dev_batches(tokenizer, cfg)
    before = held_out_errors(pair, held_out)
    t0 = time.perf_counter()
    losses = fit(lambda batch: pair.loss(pair.inputs_and_targets(batch), batch.attention_mask), params,
                 endless_batches(T.TASKS["wikitext2"], train, cfg.distill_batch, pad, cfg.seed),
                 FitOptions(steps=cfg.distill_steps, lr=cfg.distill_lr, warmup_steps=cfg.distill_warmup,
                            schedule=cfg.distill_schedule, max_grad_norm=cfg.distill_max_grad_norm,
                            progress="distill" if cfg.progress else None)).losses
    for p in emu.parameters():
        p.requires_grad_(False)
    after = held_out_errors(pair, held_out)
    objective = ("sum|e - t|^2 / sum|t|^2 + mean_tokens(|e - t|^2 / |t|^2), e = emulator(h), "
                 "t = full_middle(h), h = bottom adapter output")
    if cfg.distill_gradient_weight > 0:
        objective += (f"; + {cfg.distill_gradient_weight:g} x the same of J_e(h)^T g against J_t(h)^T g, g = the full "
                      "model's LM-loss gradient at the middle's output")
    return {"data": "wikitext2 (train part)", "objective": objective,
            "gradient_weight": cfg.distill_gradient_weight,
            "steps": cfg.distill_steps, "lr": cfg.distill_lr, "batch": cfg.distill_batch, "seq": cfg.distill_seq,
            "warmup": cfg.distill_warmup, "schedule": cfg.distill_schedule, "max_grad_norm": cfg.distill_max_grad_norm,
            "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "held_out_error_before": before["states"], "held_out_error_after": after["states"],
            **({"held_out_gradient_error_before": before["gradients"],
                "held_out_gradient_error_after": after["gradients"]} if "gradients" in after else {}),
            "seconds": round(time.perf_counter() - t0, 1)}
