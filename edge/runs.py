"""Run folders and adapter folders: what a run may reuse, and what an adapter fits.

A run folder (`--out-dir`) holds

    config.json     the run's EdgeConfig.public() (no token), written once the cloud session is open
    checkpoint.pt   weights, optimizer, step and step records (model/training.py's Checkpoint)
    adapter/        the trained LoRA in PEFT format
    metrics.json    the run's evaluations, step records and summary

A folder with a checkpoint, an adapter or metrics in it holds a run, and a new run there is refused unless it
says what it wants: `resume` (only when the settings that shape training are the same; the ones that differ are
named, as flags) or `overwrite` (the run's files are removed first; nothing else in the folder is touched).
`tandem edge train` refuses by default (--resume, --overwrite); `edge.trainer.train` resumes a matching run by
default, which is how a crashed edge picks up where it stopped.

An adapter folder is PEFT's (`adapter_config.json`, `adapter_model.safetensors`). `load_adapter` puts one into an
edge's LoRA only if it fits exactly (rank, alpha, targets, blocks), and says what differs otherwise;
`config_for_adapter` makes the edge config that fits one: the settings of the run that trained it (its
config.json, when the adapter sits in a run folder), the adapter's own LoRA shape, then the flags given.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from edge.config import EdgeConfig
from edge.flags import build, flags_of
from model.training import CheckpointError
from model.tuners import METHODS

EXISTING = ("refuse", "resume", "overwrite")  # what a run does with a folder that holds one
RUN_FILES = ("checkpoint.pt", "adapter", "metrics.json")  # any of these: the folder holds a run
CONFIG = "config.json"
# Settings that do not change what is trained; a resumed run may change them. A path names a field or a group.
FREE_ON_RESUME = {("link",), ("eval",), ("out_dir",), ("tensorboard",), ("progress",), ("progress_row",),
                  ("device",), ("name",), ("optim", "checkpoint_every")}


class RunError(CheckpointError):
    """A run folder or an adapter folder this run cannot use as asked; the message says why and what to do."""


# ---- run folders --------------------------------------------------------------------------------------------------

def _flat(nested: dict) -> dict[tuple[str, ...], object]:
    """{field path: value} for every flag of EdgeConfig found in `nested` (EdgeConfig.public()'s shape)."""
    out = {}
    for fl in flags_of(EdgeConfig):
        node = nested
        for name in fl.path:
            if not isinstance(node, dict) or name not in node:
                break
            node = node[name]
        else:
            out[fl.path] = tuple(node) if isinstance(node, list) else node
    return out


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(default)"  # e.g. --lora-targets unset: the family's targets
    return str(value)


def differences(saved: dict, now: dict) -> list[str]:
    """The settings that shape training and differ between two EdgeConfig.public() dicts, as `--flag old -> new`."""
    a, b = _flat(saved), _flat(now)
    out = []
    for fl in flags_of(EdgeConfig):
        if any(fl.path[:len(free)] == free for free in FREE_ON_RESUME):
            continue
        # a setting newer than the saved run had its default then
        old, new = a.get(fl.path, fl.default), b.get(fl.path, fl.default)
        if old != new:
            out.append(f"--{fl.dest.replace('_', '-')} {_show(old)} -> {_show(new)}")
    return out


def prepare(cfg: EdgeConfig, existing: str = "resume") -> bool:
    """Check `cfg.out_dir` before a run starts; returns whether the run resumes one found there.

    refuse: a folder holding a run is an error; resume: it must hold the same run (else the differing settings are
    named); overwrite: its run's files are removed. A folder without a run (absent, empty, other files) is used."""
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {', '.join(EXISTING)}, not {existing!r}")
    if not cfg.out_dir:
        return False
    out = Path(cfg.out_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return False
    if existing == "refuse":
        raise RunError(f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, --overwrite "
                       "to start again, or choose another --out-dir")
    if existing == "overwrite":
        remove_run(out)
        return False
    if not (out / CONFIG).exists():  # an older Tandem's run: its checkpoint is still checked as it loads
        logging.getLogger("tandem.edge").warning("%s has no %s: resuming without checking its settings", out, CONFIG)
        return True
    try:
        saved = json.loads((out / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"--resume: cannot read {out / CONFIG}: {e}") from None
    diff = differences(saved, cfg.public())
    if diff:
        raise RunError(f"--resume: {out} was trained with other settings: {'; '.join(diff)} (pass them as they were, "
                       "--overwrite to start again, or choose another --out-dir)")
    return True


def remove_run(out: Path) -> None:
    """Remove the files a run writes in `out` (and only those)."""
    for name in ("checkpoint.pt", "metrics.json", CONFIG, "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        (out / name).unlink(missing_ok=True)
    if (out / "adapter").is_dir() and not any((out / "adapter").iterdir()):
        (out / "adapter").rmdir()


def write_config(cfg: EdgeConfig) -> None:
    """config.json in the run folder: what `prepare` compares a --resume with (no token: owner-only anyway)."""
    from privacy.security.files import write_atomic
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / CONFIG, json.dumps(cfg.public(), indent=1).encode(), 0o600)


def saved_metrics(cfg: EdgeConfig) -> dict:
    """The metrics.json a resumed run left (its eval_before, measured before it stopped), or {}."""
    try:
        return json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}


# ---- adapter folders ----------------------------------------------------------------------------------------------

def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(adapter_config.json as a dict, the weights) of a PEFT adapter folder."""
    from safetensors.torch import load_file
    path = Path(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise RunError(f"{path} is not a PEFT adapter folder (no adapter_model.safetensors in it)")
    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        return config, load_file(str(weights))
    except Exception as e:  # a broken JSON or safetensors file: one line, not a traceback
        raise RunError(f"cannot read the adapter in {path}: {e}") from None


def _targets(config: dict) -> tuple[str, ...] | None:
    t = config.get("target_modules")
    return None if t is None else tuple(sorted([t] if isinstance(t, str) else t))


def _blocks(config: dict) -> list[int] | None:
    b = config.get("layers_to_transform")
    return None if b is None else sorted([b] if isinstance(b, int) else b)


def _span(blocks) -> str:
    blocks = sorted(blocks)
    if blocks and blocks == list(range(blocks[0], blocks[-1] + 1)) and len(blocks) > 2:
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks)) or "none"


def load_adapter(lora, path: str | Path) -> None:
    """Load the PEFT adapter in `path` into `lora` (the --peft method's set, model/tuners/) if it fits exactly; else
    RunError naming what differs."""
    config, state = read_adapter(path)
    kind = lora.peft_type
    if config.get("peft_type", kind) != kind:
        theirs = next((m.name for m in METHODS.values() if m.peft_type == config.get("peft_type")), config["peft_type"])
        raise RunError(f"the adapter in {path} does not fit this edge: it is {config['peft_type']} (--peft {theirs}), "
                       f"this edge trains {kind}")
    diff = _lora_differences(config, lora) if kind == "LORA" else []
    here = {"num_virtual_tokens": getattr(lora, "num_virtual", None),
            "reduction_factor": getattr(lora.cfg, "reduction_factor", None)}
    for key, flag in (("num_virtual_tokens", "--prompt-tokens"), ("reduction_factor", "--adapter-reduction")):
        if key in config and here[key] is not None and config[key] != here[key]:
            diff.append(f"{flag} {config[key]} (here {here[key]})")
    ours_keys = set(lora.peft_state_dict())
    theirs = {k.replace(".default.", ".") for k in state}
    if not diff and ours_keys != theirs:
        diff.append(f"{len(theirs - ours_keys)} weights this edge has no place for and {len(ours_keys - theirs)} it "
                    "lacks")
    if diff:
        raise RunError(f"the adapter in {path} does not fit this edge: it has {'; '.join(diff)}")
    try:
        lora.load_peft_state_dict(state)
    except (KeyError, ValueError) as e:
        raise RunError(f"the adapter in {path} does not fit this edge: {e}") from None


def _lora_differences(config: dict, lora) -> list[str]:
    """The LoRA settings in which a LoRA adapter's config differs from `lora`'s, as the flags that set them."""
    c = lora.cfg
    diff = []
    for key, flag, here in (("use_dora", "--lora-dora", c.use_dora), ("use_rslora", "--lora-rslora", c.use_rslora)):
        if bool(config.get(key, False)) != here:
            diff.append(f"{flag if config.get(key) else '--no-' + flag[2:]} (here {'on' if here else 'off'})")
    if config.get("r", c.r) != c.r:
        diff.append(f"--lora-r {config['r']} (here {c.r})")
    if config.get("lora_alpha", c.alpha) != c.alpha:
        diff.append(f"--lora-alpha {config['lora_alpha']} (here {c.alpha})")
    if _targets(config) not in (None, tuple(sorted(c.targets))):
        diff.append(f"--lora-targets {','.join(_targets(config))} (here {','.join(c.targets)})")
    blocks = _blocks(config)
    if blocks is not None and blocks != sorted(c.blocks):
        diff.append(f"LoRA on blocks {_span(blocks)} (here {_span(c.blocks)}: set --cloud-lora, --k and --m as "
                    "the run that trained it)")
    return diff


def adapter_blocks(path: str | Path) -> list[int] | None:
    """The blocks an adapter folder has LoRA on (adapter_config.json's layers_to_transform), if it says."""
    config_file = Path(path) / "adapter_config.json"
    return _blocks(json.loads(config_file.read_text())) if config_file.exists() else None


# Flags of `edge train` that describe how the adapter was trained, not how it is used: eval/generate skip them.
TRAIN_ONLY = {"steps", "lr", "batch_size", "seed", "checkpoint_every", "warmup_steps", "schedule", "max_grad_norm",
              "grad_accum_steps", "out_dir", "init_adapter", "tensorboard", "eval_before", "eval_after", "shard",
              "num_shards", "train_file", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_freeze_a"}


def config_for_adapter(adapter: str | None, given: dict) -> tuple[EdgeConfig, bool]:
    """The edge config that uses `adapter`: the settings of the run that trained it (<adapter>/../config.json, if
    there), overridden by the adapter's own LoRA shape, overridden by the flags `given` ({dest: value}, only those
    typed). Returns (config, whether a run config was found)."""
    values: dict = {}
    found = False
    if adapter is not None:
        run_config = Path(adapter).parent / CONFIG
        if run_config.is_file():
            try:
                saved = _flat(json.loads(run_config.read_text()))
            except (OSError, ValueError):
                saved = {}
            found = bool(saved)
            skip = {("link",), ("device",), ("progress",), ("progress_row",)}
            for fl in flags_of(EdgeConfig):
                if fl.path in saved and not any(fl.path[:len(s)] == s for s in skip) and (
                        fl.dest not in TRAIN_ONLY or fl.dest.startswith("lora_")):
                    values[fl.dest] = saved[fl.path]
        config, _ = read_adapter(adapter)
        for key, dest in (("r", "lora_r"), ("lora_alpha", "lora_alpha")):
            if key in config:
                values[dest] = config[key]
        if _targets(config) is not None and tuple(sorted(values.get("lora_targets", ()))) != _targets(config):
            values["lora_targets"] = _targets(config)
    values.update(given)
    return build(EdgeConfig, values), found
