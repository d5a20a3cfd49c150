"""Tune the adapter on the data owner's side, through the frozen emulator, on data that never leaves the device.

The data owner's model is the bundle's compact model: adapter blocks + emulator. Only the adapter trains, either
whole blocks (mode "full", as in the paper) or LoRA on them (mode "lora"), on both ends (the default, as in the
paper) or on the top blocks alone (`train_blocks="top"`, the paper code's `--freeze_bottom`); everything else is
frozen. Training and
evaluation follow the split trainer (`edge/trainer.py`): the task's prompt, cross-entropy of the answer token at the
answer position, AdamW, and accuracy as the argmax over the label words' logits, so the numbers are comparable.

What goes back to the cloud is an adapter folder (see `emulator/bundle.py`): the tuned adapter blocks, or the LoRA
weights in PEFT format, named as in the full model so the cloud plugs them in directly.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import tasks as T
from emulator.bundle import ADAPTER_FORMAT, Emulated, block_of, load_bundle, manifest_digest, renumber, write_manifest
from model.tuners.lora import LoRAConfig, LoRASet
from model.segments import family_of
from model.training import FitOptions, endless_batches, evaluate, fit

DEFAULT_LR = {"full": 1e-4, "lora": 2e-3}


@dataclass
class TuneConfig:
    task: str = "sst2"
    train_file: str | None = None  # the data owner's own data (TSV/CSV/JSONL); default: the shared set
    dev_file: str | None = None
    mode: str = "lora"  # "lora": LoRA on the adapter blocks; "full": train the adapter blocks whole
    train_blocks: str = "both"  # adapter blocks that train: "both" ends, or "top" (the bottom adapter stays as it is)
    lr: float | None = None  # default by mode: DEFAULT_LR
    steps: int = 150
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    eval_examples: int = 500
    eval_batch_size: int = 32
    eval_before: bool = True  # the emulator's zero-shot accuracy, before tuning
    eval_after: bool = True
    seed: int = 0
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


# ------------------------------------------------------------------------------------------------- the adapter

@dataclass
class Adapter:
    """The trainable part of a model: whole adapter blocks, or LoRA hooked onto them."""
    model: torch.nn.Module
    positions: list[int]  # adapter blocks, numbered as in `model`
    mode: str
    lora: LoRASet | None = None
    handles: list = field(default_factory=list)

    def parameters(self) -> list[torch.nn.Parameter]:
        if self.lora is not None:
            return list(self.lora.parameters())
        blocks = family_of(self.model).blocks(self.model)
        return [p for i in self.positions for p in blocks[i].parameters()]

    def state(self, to_full: dict[int, int]) -> dict[str, torch.Tensor]:
        """The adapter's weights, named as in the full model (`to_full` maps this model's blocks to the full one's)."""
        if self.lora is not None:
            return {renumber(k, to_full): v for k, v in self.lora.peft_state_dict().items()}
        keep = set(self.positions)
        return {renumber(k, to_full): v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                if block_of(k) in keep}

    def merge(self) -> None:
        """Fold LoRA into the base weights (W += scaling * B A) and drop the hooks: a plain model for export."""
        if self.lora is None:
            return
        for h in self.handles:
            h.remove()
        self.handles = []
        merge_lora(self.model, self.lora.peft_state_dict(), self.lora.cfg.scaling, {b: b for b in self.positions})
        self.lora = None


def trained_blocks(layout, which: str) -> tuple[int, ...]:
    """The adapter blocks (full-model numbers) that train: all of them ("both") or the top ones ("top")."""
    if which not in ("both", "top"):
        raise ValueError(f"train_blocks must be 'both' or 'top', got {which!r}")
    return tuple(layout.adapter if which == "both" else layout.top)


def make_adapter(model, positions: list[int], mode: str, cfg: TuneConfig) -> Adapter:
    """Freeze `model` except its adapter: the blocks at `positions` (mode full) or fresh LoRA on them (mode lora)."""
    if mode not in ("full", "lora"):
        raise ValueError(f"adapter mode must be 'full' or 'lora', got {mode!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = Adapter(model, list(positions), mode)
    if mode == "lora":
        torch.manual_seed(cfg.seed)
        adapter.lora = LoRASet(model, LoRAConfig(cfg.lora_r, cfg.lora_alpha, 0.0, tuple(cfg.lora_targets),
                                                 list(positions)))
        adapter.handles = adapter.lora.attach(model, positions)
    for p in adapter.parameters():
        p.requires_grad_(True)
    return adapter


def merge_lora(model, peft_state: dict[str, torch.Tensor], scaling: float, to_model: dict[int, int]) -> None:
    """Add PEFT-format LoRA (`...{module}.lora_A.weight`, `...lora_B.weight`) into `model`'s weights, in place.

    PEFT does the merge (`merge_and_unload`: W += scaling B A, transposed for GPT-2's Conv1D); the keys are first
    renumbered to `model`'s blocks (`to_model`), so a compact emulator model is merged like the full one."""
    import peft
    state = {renumber(k.removeprefix("base_model.model.").replace(".default.weight", ".weight"), to_model): v
             for k, v in peft_state.items()}
    sites = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k})
    modules = dict(model.named_modules())
    for site in sites:
        if site not in modules:
            raise KeyError(f"LoRA for {site}.weight, which this model does not have")
    if not sites:
        return
    r = state[sites[0] + ".lora_A.weight"].shape[0]
    cfg = peft.LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=0.0, target_modules=sites,
                          fan_in_fan_out=family_of(model).fan_in_fan_out)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the LoRA layers' init draws from the RNG
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes on PEFT's probing
        wrapped = peft.PeftModel(model, cfg)
    peft.set_peft_model_state_dict(wrapped, {"base_model.model." + k: v for k, v in state.items()})
    with torch.no_grad():
        wrapped.merge_and_unload()  # puts the original (now merged) modules back into `model`
    for p, flag in trainable:  # PEFT froze everything but LoRA
        p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------- train and evaluate

def hidden(model, batch: T.Batch) -> torch.Tensor:
    return model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            use_cache=False).last_hidden_state


def train_adapter(adapter: Adapter, task: T.Task, items: list[dict], cfg: TuneConfig, pad_id: int,
                  desc: str = "tune") -> dict:
    """AdamW on the adapter for cfg.steps batches (`model.training.fit`). Returns losses and per-step seconds."""
    model = adapter.model
    head = model.get_output_embeddings()
    model.train()
    run = fit(lambda batch: T.loss_from_hidden(task, hidden(model, batch), batch, head)[0], adapter.parameters(),
              endless_batches(task, items, cfg.batch_size, pad_id, cfg.seed),
              FitOptions(steps=cfg.steps, lr=cfg.learning_rate, progress=desc if cfg.progress else None))
    losses, seconds = run.losses, run.seconds
    model.eval()
    for p in adapter.parameters():
        p.requires_grad_(False)
    return {"steps": cfg.steps, "lr": cfg.learning_rate, "batch_size": cfg.batch_size, "mode": adapter.mode,
            "trainable_parameters": sum(p.numel() for p in adapter.parameters()),
            "first_loss": losses[0] if losses else None,
            "mean_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "step_seconds_median": median(seconds[3:] or seconds), "losses": losses, "step_seconds": seconds}


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def accuracy(model, task: T.Task, items: list[dict], pad_id: int, label_ids: list[int],
             batch_size: int = 32) -> float:
    """Share of examples whose label word has the highest logit among the label words (`model.training.evaluate`)."""
    model.eval()
    return evaluate(lambda batch: hidden(model, batch), model.get_output_embeddings(), task, items, pad_id, label_ids,
                    batch_size)["accuracy"]


@dataclass
class TaskData:
    task: T.Task
    train: list[dict]
    dev: list[dict]
    pad_id: int
    label_ids: list[int]


def task_data(name: str, tokenizer, eval_examples: int, train_file: str | None = None,
              dev_file: str | None = None) -> TaskData:
    """Encode a classification task as the split trainer does (dev = its first `eval_examples` examples)."""
    task = T.TASKS[name]
    if task.kind != "classify":
        raise ValueError(f"offsite tuning evaluates classification tasks; {name!r} is {task.kind}")
    train = T.encode(task, T.load_split(name, "train", train_file), tokenizer)
    dev = T.encode(task, T.load_split(name, "dev", dev_file), tokenizer)[:eval_examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TaskData(task, train, dev, pad, T.label_token_ids(task, tokenizer))


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------------------------- save / tune

def save_adapter(out_dir: str | Path, adapter: Adapter, emulated: Emulated, cfg: TuneConfig, record: dict) -> dict:
    """Write the adapter folder: weights named as in the full model, and a manifest bound to the bundle."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the adapter")
    out.mkdir(parents=True, exist_ok=True)
    layout = emulated.layout
    to_full = {j: b for j, b in enumerate(layout.kept)}
    state = adapter.state(to_full)
    lora = None
    if adapter.lora is not None:
        (out / "peft").mkdir()
        peft_cfg = adapter.lora.peft_config(emulated.manifest["source"]["model"])
        peft_cfg.layers_to_transform = sorted(to_full[b] for b in adapter.positions)
        peft_cfg.save_pretrained(str(out / "peft"))
        save_file(state, str(out / "peft" / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora = {"r": adapter.lora.cfg.r, "alpha": adapter.lora.cfg.alpha, "targets": list(adapter.lora.cfg.targets)}
    else:
        save_file(state, str(out / "adapter.safetensors"), metadata={"format": "pt"})
    summary = {k: v for k, v in record.items() if k not in ("losses", "step_seconds")}
    manifest = {"format": ADAPTER_FORMAT, "mode": adapter.mode, "lora": lora, "train_blocks": cfg.train_blocks,
                "blocks": sorted(to_full[p] for p in adapter.positions),
                "bundle": manifest_digest(emulated.manifest), "source": emulated.manifest["source"],
                "task": cfg.task, "training": summary}
    return write_manifest(out, manifest)


def tune(cfg: TuneConfig, bundle_dir: str | Path, out_dir: str | Path, *, emulated: Emulated | None = None) -> dict:
    """Load and verify the bundle, tune the adapter on local data through the emulator, save it.

    Returns metrics (dev accuracy of the emulator before and after, the training record); metrics["_adapter"] is the
    tuned `Adapter` on the emulator model (for export)."""
    emulated = emulated or load_bundle(bundle_dir)
    tok = emulated.tokenizer or T.tiny_tokenizer()
    data = task_data(cfg.task, tok, cfg.eval_examples, cfg.train_file, cfg.dev_file)
    metrics: dict = {"config": asdict(cfg), "bundle": manifest_digest(emulated.manifest)}
    if cfg.eval_before:
        metrics["emulator_zero_shot"] = accuracy(emulated.model, data.task, data.dev, data.pad_id, data.label_ids,
                                                 cfg.eval_batch_size)
    torch.manual_seed(cfg.seed)
    positions = [emulated.layout.position(b) for b in trained_blocks(emulated.layout, cfg.train_blocks)]
    adapter = make_adapter(emulated.model, positions, cfg.mode, cfg)
    record = train_adapter(adapter, data.task, data.train, cfg, data.pad_id)
    record["peak_rss_mb"] = peak_rss_mb()
    if cfg.eval_after:
        metrics["emulator_fine_tuned"] = accuracy(emulated.model, data.task, data.dev, data.pad_id, data.label_ids,
                                                  cfg.eval_batch_size)
    record["dev_accuracy"] = {k: metrics[k] for k in ("emulator_zero_shot", "emulator_fine_tuned") if k in metrics}
    metrics["adapter_manifest"] = save_adapter(out_dir, adapter, emulated, cfg, record)
    metrics["training"] = record
    metrics["_adapter"] = adapter
    return metrics
