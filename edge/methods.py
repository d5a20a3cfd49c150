"""Which PEFT method the edge trains (--peft) and where: the options checked before anything loads, then the set of
trainable weights built from the full model (model/tuners/).

A site method (lora, ia3, adapter) adapts the edge's own blocks and, with --cloud-lora edge or carried, the cloud's; an
input method (prompt, ptuning) trains virtual tokens in front of the input and leaves every block frozen; prefix
tuning puts keys and values in front of every layer's attention, the cloud's carried.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import get_args

from edge.config import EdgeConfig
from edge.flags import flags_of
from model.tuners import METHODS, method_set, prefix_config, prompt_config
from privacy.defences.template import template_literals
from protocol.step import CloudLoRA


def check_method(cfg: EdgeConfig) -> None:
    """--peft, --cloud-lora and the options that go with them, each mistake as one line naming the fix."""
    method, mode = cfg.peft.method, cfg.lora.cloud
    if method not in METHODS:
        raise ValueError(f"--peft must be one of {', '.join(METHODS)}, got {method!r}")
    if mode not in get_args(CloudLoRA):
        raise ValueError(f"--cloud-lora must be one of {', '.join(get_args(CloudLoRA))}, got {mode!r}")
    modes = METHODS[method].cloud_modes
    if mode not in modes:
        raise ValueError(f"--peft {method} takes --cloud-lora {' or '.join(modes)}, not {mode}" + {
            "ia3": " ((IA)³ vectors are far cheaper carried than computed as a branch on the edge)",
            "adapter": " (a bottleneck adapter on a cloud block runs as a branch on the edge: --cloud-lora edge)",
            "prompt": " (prompt tuning trains nothing in the cloud's blocks)",
            "ptuning": " (P-tuning trains nothing in the cloud's blocks)",
            "prefix": " (every layer has a prefix, the cloud's too: they ride each step)"}.get(method, ""))
    _check_foreign_options(cfg)
    _check_defences(cfg, mode)
    if mode == "carried" and cfg.lora.dropout > 0:
        raise ValueError("--cloud-lora carried runs the cloud blocks' LoRA on the cloud, which applies no dropout: "
                         "give --lora-dropout 0, or use --cloud-lora edge")
    if cfg.lora.dora and mode == "edge":
        raise ValueError("--lora-dora needs the base weights where its branch runs, and with --cloud-lora edge the "
                         "edge has not the cloud's: use --cloud-lora carried or none")
    if method != "lora" and cfg.kr.enabled:
        raise ValueError("--kr (Kill & Revive) switches LoRA blocks on and off: it takes --peft lora only")
    if METHODS[method].kind == "input":  # the prompt options, checked where PromptSet checks them
        from model.tuners.prompt import check_prompt_config
        check_prompt_config(prompt_config(method, method_options(cfg)))
    if method == "prefix":
        from model.tuners.prefix import check_prefix_config
        check_prefix_config(prefix_config(method_options(cfg)))


def _check_defences(cfg: EdgeConfig, mode: str) -> None:
    """--noise-nopeek is a weight >= 0. --noise-label-mask and --noise-label-free: the per-example factors apply on the
    edge only where nothing of the cloud's backward is summed over the batch: the frozen split and DLoRA, not carried
    (privacy/defences/labels.py)."""
    if not cfg.noise.nopeek >= 0:
        raise ValueError(f"--noise-nopeek is a weight >= 0 (0: off), got {cfg.noise.nopeek}")
    scale_range, given = cfg.noise.label_mask, []
    if scale_range is not None:
        if scale_range < 1:
            raise ValueError(f"--noise-label-mask is a scale range R >= 1 (factors in [1/R, R]), got {scale_range}")
        given.append("--noise-label-mask")
    if cfg.noise.label_free:
        given.append("--noise-label-free")
    for flag in given:
        if mode == "carried":
            raise ValueError(f"{flag} cannot be used with --cloud-lora carried: the cloud sums the weight gradients "
                             "over the batch's examples, so the per-example factors would not apply; use "
                             "--cloud-lora none")


def check_task_defences(cfg: EdgeConfig, task) -> None:
    """The defences that depend on the task. --noise-label-free needs a two-class classification task: its loss is a
    function of one logit margin.
    --noise-template-only needs a template with literal text before its first field and after its last (the
    positions it sends; the answer position is the suffix's last)."""
    if cfg.noise.template_only:
        prefix, suffix = template_literals(task.template) if task.kind == "classify" else ("", "")  # tasks have fields
        if not (prefix and suffix):
            raise ValueError(f"--noise-template-only needs a classification prompt that starts and ends with literal "
                             f"text around its fields, and {task.name}'s does not: drop --noise-template-only")
    if cfg.noise.label_free and (task.kind != "classify" or task.num_classes != 2):
        what = "a language-modelling task" if task.kind != "classify" else f"{task.num_classes} classes"
        raise ValueError(f"--noise-label-free takes a two-class task (one logit margin), and {task.name} has {what}: "
                         "drop --noise-label-free or use a two-class task (sst2, mrpc)")


def _check_foreign_options(cfg: EdgeConfig) -> None:
    """An option of other methods than --peft's, set to other than its default, is refused."""
    method = cfg.peft.method
    owners: dict[str, list[str]] = {}
    for m in METHODS.values():
        for dest in m.options:
            owners.setdefault(dest, []).append(m.name)
    defaults = EdgeConfig()
    for fl in flags_of(EdgeConfig):
        names = owners.get(fl.dest, [method])
        if method not in names and _value(cfg, fl.path) != _value(defaults, fl.path):
            raise ValueError(f"--{fl.dest.replace('_', '-')} is an option of --peft {' and '.join(names)}, not of "
                             f"--peft {method}")


def _value(cfg, path):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def trained_blocks(cfg: EdgeConfig, cut) -> tuple[list[int], list[int]]:
    """(the edge's blocks the method adapts, the cloud's blocks it adapts): an input method adapts none."""
    if METHODS[cfg.peft.method].kind == "input":
        return [], []
    return [*cut.bottom, *cut.top], list(cut.cloud) if cfg.lora.cloud != "none" else []


def method_options(cfg: EdgeConfig) -> dict:
    """The PEFT method's options by flag name (--lora-r, --ia3-targets, ...), as model/tuners `method_set` takes them."""
    return {**{f"lora_{k}": v for k, v in asdict(cfg.lora).items()}, **asdict(cfg.peft)}


def tuner_set(model, cfg: EdgeConfig, blocks: list[int], tokenizer=None):
    """The method's set of trainable weights for `blocks` (model/tuners `method_set`)."""
    return method_set(model, cfg.peft.method, blocks, method_options(cfg), tokenizer)


def carried_method(cfg: EdgeConfig) -> str:
    """The session's carried_method (protocol/step.py CARRIED_PARAMS)."""
    if cfg.peft.method == "lora":
        return "dora" if cfg.lora.dora else "lora"
    return cfg.peft.method


def check_step_tokens(em, cfg: EdgeConfig, train_items: list[dict], dev_items: list[dict]) -> None:
    """The largest step of training (--batch-size shuffled items, so the longest among them) and of evaluation
    (--eval-batch-size items sorted by length) fits the cloud's max_tokens_per_step (its OpenSessionReply): batch x
    (an input method's virtual tokens + the longest sequence). Else one line naming the flags to lower."""
    session = getattr(em.cloud.link, "session", None)
    limit = getattr(session, "max_tokens_per_step", 0)
    if not limit:
        return
    V = em.prompt.num_virtual if em.prompt is not None else 0
    shift = 1 if em.task.kind == "lm" else 0  # an LM window's last token is only a target

    def largest(items: list[dict], size: int, ordered: bool) -> tuple[int, int]:
        lengths = sorted(len(it["ids"]) - shift for it in items)
        if not ordered:  # shuffled: a full batch may hold the longest
            return min(size, len(lengths)), lengths[-1]
        chunks = [lengths[i:i + size] for i in range(0, len(lengths), size)]
        return max(((len(c), c[-1]) for c in chunks), key=lambda bt: bt[0] * (V + bt[1]))

    for items, size, flag, ordered in ((train_items, cfg.optim.batch_size, "--batch-size", False),
                                       (dev_items, cfg.eval.batch_size, "--eval-batch-size", True)):
        if not items:
            continue
        B, T_ = largest(items, size, ordered)
        if B * (V + T_) > limit:
            seq = f"{V} virtual tokens (--prompt-tokens) + up to {T_} tokens" if V else f"up to {T_} tokens"
            fix = f"lower --prompt-tokens or {flag}" if V else f"lower {flag}"
            raise ValueError(f"a step of {B} sequences ({flag}) of {seq} sends {B * (V + T_)} tokens, more than "
                             f"the cloud accepts ({limit} per step, its max_tokens_per_step): {fix}")


__all__ = ["check_method", "check_step_tokens", "trained_blocks", "tuner_set", "carried_method"]
