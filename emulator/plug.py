"""Plug a data owner's adapter into the full model on the cloud, and measure what offsite tuning gave.

The table follows the paper (Xiao, Lin & Han, 2023, Table 2), all on the same dev examples:

    full model zero-shot     the backbone as it is
    emulator zero-shot       adapter blocks + emulator, untuned: what the data owner could get without tuning
    emulator fine-tuned      the tuned adapter on the emulator: what the data owner can get without the cloud
    plug-in                  the tuned adapter on the full model: the point of offsite tuning
    full fine-tuning         the same adapter tuned on the full model (same data, steps, lr): the reference

The adapter must come from the bundle the cloud holds (its manifest names the bundle's digest) and fit the full model
the bundle was cut from (its fingerprint); anything else is refused.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from emulator.bundle import ADAPTER_FORMAT, BundleError, Emulated, block_of, manifest_digest, renumber, verify_dir
from emulator.tune import TuneConfig, accuracy, make_adapter, merge_lora, task_data, train_adapter
from model.load import fingerprint


@dataclass
class ReturnedAdapter:
    """An adapter folder, verified and loaded: its manifest and its tensors (full-model names)."""
    manifest: dict
    tensors: dict[str, torch.Tensor]
    scaling: float = 1.0  # LoRA only: alpha / r

    @property
    def blocks(self) -> list[int]:
        return list(self.manifest["blocks"])


def load_adapter(folder: str | Path) -> ReturnedAdapter:
    """Verify an adapter folder (format, sha256 of every file) and read its weights."""
    from safetensors.torch import load_file
    folder = Path(folder)
    manifest = verify_dir(folder, ADAPTER_FORMAT)
    if manifest["mode"] == "lora":
        tensors = load_file(str(folder / "peft" / "adapter_model.safetensors"))
        cfg = json.loads((folder / "peft" / "adapter_config.json").read_text())
        scaling = cfg["lora_alpha"] / cfg["r"]
    elif manifest["mode"] == "full":
        tensors, scaling = load_file(str(folder / "adapter.safetensors")), 1.0
    else:
        raise BundleError(f"{folder}: unknown adapter mode {manifest['mode']!r}")
    stray = sorted({block_of(k) for k in tensors} - set(manifest["blocks"]))
    if stray:
        raise BundleError(f"{folder}: carries weights outside its adapter blocks {manifest['blocks']}: {stray}")
    return ReturnedAdapter(manifest, tensors, scaling)


def check_binding(adapter: ReturnedAdapter, bundle_manifest: dict, full=None) -> None:
    """Refuse an adapter tuned on another bundle, or a full model other than the one the bundle was cut from."""
    if adapter.manifest["bundle"] != manifest_digest(bundle_manifest):
        raise BundleError("the adapter was tuned on a different bundle than this one (bundle digest mismatch)")
    bundle_adapter = set(bundle_manifest["layout"]["bottom"] + bundle_manifest["layout"]["top"])
    if not adapter.blocks or not set(adapter.blocks) <= bundle_adapter:
        raise BundleError(f"the adapter's blocks {adapter.blocks} are not among the bundle's adapter blocks "
                          f"{sorted(bundle_adapter)}")
    if full is not None and fingerprint(full) != bundle_manifest["source"]["fingerprint"]:
        raise BundleError("this full model is not the one the bundle was cut from (fingerprint mismatch)")


def apply_adapter(model, adapter: ReturnedAdapter, to_model: dict[int, int]) -> None:
    """Put the adapter into `model` in place. `to_model` maps full-model block numbers to `model`'s."""
    if adapter.manifest["mode"] == "lora":
        merge_lora(model, adapter.tensors, adapter.scaling, to_model)
        return
    state = {renumber(k, to_model): v for k, v in adapter.tensors.items()}
    expected = {k for k in model.state_dict() if block_of(k) in {to_model[b] for b in adapter.blocks}}
    if set(state) != expected:
        raise BundleError(f"adapter tensors do not cover the adapter blocks: missing {sorted(expected - set(state))[:3]}"
                          f", unexpected {sorted(set(state) - expected)[:3]}")
    model.load_state_dict(state, strict=False)


def plug(full, adapter: ReturnedAdapter, bundle_manifest: dict, copy_model: bool = True):
    """The full model with the adapter plugged in (a copy unless copy_model=False)."""
    check_binding(adapter, bundle_manifest, full)
    plugged = copy.deepcopy(full) if copy_model else full
    apply_adapter(plugged, adapter, {b: b for b in adapter.blocks})
    return plugged.eval()


def reference_config(adapter: ReturnedAdapter, task: str, eval_examples: int, steps: int | None = None,
                     progress: bool = True) -> TuneConfig:
    """Full-model fine-tuning with the data owner's settings (mode, blocks, lr, steps, batch, LoRA shape)."""
    tr, lora = adapter.manifest["training"], adapter.manifest.get("lora") or {}
    cfg = TuneConfig(task=task, mode=adapter.manifest["mode"], lr=tr["lr"], steps=steps if steps is not None
                     else tr["steps"], batch_size=tr["batch_size"], eval_examples=eval_examples, progress=progress,
                     train_blocks=adapter.manifest.get("train_blocks", "both"))
    if lora:
        cfg.lora_r, cfg.lora_alpha, cfg.lora_targets = lora["r"], lora["alpha"], tuple(lora["targets"])
    return cfg


def offsite_table(full, tokenizer, emulated: Emulated, adapter: ReturnedAdapter, task: str = "sst2",
                  eval_examples: int = 500, eval_batch_size: int = 32, reference_steps: int | None = None,
                  progress: bool = True, train_file: str | None = None, dev_file: str | None = None) -> dict:
    """Evaluate the five rows of the table on the task's dev set. Returns the figures and the plugged model.

    `reference_steps=0` skips full-model fine-tuning. The full model is trained in place by the reference run, so
    the plug-in is evaluated (and returned) on a copy made before it."""
    check_binding(adapter, emulated.manifest, full)
    data = task_data(task, tokenizer, eval_examples, train_file, dev_file)
    acc = lambda m: accuracy(m, data.task, data.dev, data.pad_id, data.label_ids, eval_batch_size)  # noqa: E731
    res: dict = {"task": task, "dev_examples": len(data.dev), "mode": adapter.manifest["mode"], "tuned": adapter.blocks,
                 "layout": emulated.manifest["layout"], "drop_ratio": emulated.manifest["drop_ratio"],
                 "distillation": emulated.manifest["distillation"], "rows": {}}
    rows = res["rows"]
    rows["full model zero-shot"] = acc(full)
    rows["emulator zero-shot"] = acc(emulated.model)
    emu_tuned = copy.deepcopy(emulated.model)
    apply_adapter(emu_tuned, adapter, {b: emulated.layout.position(b) for b in adapter.blocks})
    rows["emulator fine-tuned"] = acc(emu_tuned)
    del emu_tuned
    plugged = plug(full, adapter, emulated.manifest)
    rows["plug-in"] = acc(plugged)
    res["owner_training"] = adapter.manifest["training"]
    if reference_steps != 0:
        cfg = reference_config(adapter, task, eval_examples, reference_steps, progress)
        torch.manual_seed(cfg.seed)
        ref = make_adapter(full, adapter.blocks, cfg.mode, cfg)  # the blocks the owner tuned
        record = train_adapter(ref, data.task, data.train, cfg, data.pad_id, desc="full fine-tuning")
        rows["full fine-tuning"] = acc(full)
        res["reference_training"] = {k: v for k, v in record.items() if k not in ("losses", "step_seconds")}
    res["_plugged"] = plugged
    return res


ROW_NOTES = {"full model zero-shot": "the backbone as it is",
             "emulator zero-shot": "adapter + emulator, untuned",
             "emulator fine-tuned": "tuned adapter on the emulator (data owner)",
             "plug-in": "tuned adapter in the full model (cloud)",
             "full fine-tuning": "same adapter tuned on the full model (reference)"}


def differences(rows: dict) -> dict:
    """What the paper reads off its table: plug-in against full fine-tuning (the method's cost in accuracy) and
    against the emulator fine-tuned (what the data owner gains from the cloud; positive when the emulator is worse)."""
    out = {}
    if "plug-in" in rows and "full fine-tuning" in rows:
        out["plug-in - full fine-tuning"] = rows["plug-in"] - rows["full fine-tuning"]
    if "plug-in" in rows and "emulator fine-tuned" in rows:
        out["plug-in - emulator fine-tuned"] = rows["plug-in"] - rows["emulator fine-tuned"]
    return out


def format_table(res: dict) -> str:
    """The paper's table for one task, and the data owner's tuning cost next to full-model tuning."""
    from cli.report import table
    rows = [[name, f"{100 * a:.1f}%", ROW_NOTES.get(name, "")] for name, a in res["rows"].items()]
    rows += [[name, f"{100 * d:+.1f} pt", ""] for name, d in differences(res["rows"]).items()]
    out = [f"{res['task']} dev ({res['dev_examples']} examples), adapter {res['mode']}, "
           f"blocks {res['layout']['bottom']}+{res['layout']['top']} (tuned: {res.get('tuned')}), emulator {len(res['layout']['emulator'])} of "
           f"{len(res['layout']['emulator']) / (1 - res['drop_ratio']):.0f} middle blocks (drop {res['drop_ratio']:.2f})"
           f", distillation: {_distill_note(res['distillation'])}",
           table(["", "accuracy", ""], rows)]
    own, ref = res.get("owner_training"), res.get("reference_training")
    if own and ref:
        e, f = own["step_seconds_median"], ref["step_seconds_median"]
        out += ["", table(["tuning step", "seconds (median)", "where measured"],
                          [["on the emulator", f"{e:.3f}", "the data owner's run (adapter manifest)"],
                           ["on the full model", f"{f:.3f}", "the reference run here"],
                           ["ratio", f"{e / f:.2f}", "side by side with peak memory: bench/offsite.py"]])]
    return "\n".join(out)


def _distill_note(rec: dict | None) -> str:
    if not rec:
        return "none"
    return (f"{rec['steps']} steps on {rec['data']}, held-out error {rec['held_out_error_before']:.4g} -> "
            f"{rec['held_out_error_after']:.4g}")
