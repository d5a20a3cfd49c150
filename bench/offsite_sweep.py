"""Offsite tuning against the emulator's size (the paper's Figure 4): for each kept fraction of the middle blocks,
cut and distill an emulator, tune the adapter through it, and measure emulator-tuned and plug-in accuracy.

    python bench/offsite_sweep.py --sweep 0.3,0.5,0.7 --out runs/offsite-sweep/size

Every kept fraction starts from the same full model, tunes with the same settings, batches and seed, and is scored on
the same dev examples; full zero-shot and full fine-tuning (the same adapter tuned on the full model) are measured
once. With --seeds, every tuning (emulator and full fine-tuning alike) runs once per seed (the adapter's start and the
batch order; a seed moves a row by several points on SST-2 dev 500) and each row shows the mean over the seeds; the
JSON keeps every seed's figure. The teacher's targets of each distillation batch are computed once and shared by
every emulator (the batches are the same). Everything runs in this process, in memory: `bench/offsite.py` is the run
through bundle files, sealing and plug-in, and the one that measures step time and memory side by side in fresh
processes.

Each row also holds the cosine between each adapter block's gradient through the emulator and through the full
model (`emulator.build.gradient_alignment`, LM loss on held-out WikiText-2), the bundle manifest's figure.

Prints a table, writes OUT/sweep.png (plug-in and emulator-tuned accuracy against kept fraction) and OUT/sweep.json,
appends one JSON line per kept fraction to --log, and ends by printing one line holding a JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tasks as T  # noqa: E402
from cli.report import table  # noqa: E402
from emulator.build import BuildConfig, check_config, emulator_model, gradient_alignment, make_layout  # noqa: E402
from emulator.distill import distill  # noqa: E402
from emulator.plug import ReturnedAdapter, apply_adapter  # noqa: E402
from emulator.tune import (TaskData, TuneConfig, accuracy, make_adapter, task_data, train_adapter,  # noqa: E402
                           trained_blocks)
from model.load import load_model  # noqa: E402
from model.segments import family_of  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    b, t = BuildConfig(), TuneConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (its dense Hugging Face copy), a folder or tiny-*")
    p.add_argument("--task", default=t.task)
    p.add_argument("--sweep", default="0.3,0.5,0.7", help="kept fractions of the middle blocks, comma-separated")
    p.add_argument("--bottom", type=int, default=b.bottom)
    p.add_argument("--top", type=int, default=b.top)
    p.add_argument("--mlp-keep", type=float, default=b.mlp_keep,
                   help="share of each kept middle block's MLP neurons kept (emulator/prune.py)")
    p.add_argument("--distill-steps", type=int, default=b.distill_steps)
    p.add_argument("--distill-lr", type=float, default=b.distill_lr)
    p.add_argument("--distill-warmup", type=int, default=b.distill_warmup)
    p.add_argument("--distill-schedule", default=b.distill_schedule)
    p.add_argument("--distill-max-grad-norm", type=float, default=b.distill_max_grad_norm)
    p.add_argument("--distill-gradient-weight", type=float, default=b.distill_gradient_weight,
                   help="> 0: distillation also matches the gradients the emulator passes down (emulator/distill.py)")
    p.add_argument("--mode", default=t.mode, choices=["full", "lora"])
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--train-blocks", default="both",
                   help="which adapter blocks train, comma-separated variants: both, top (the bottom adapter stays)")
    p.add_argument("--seeds", default=str(t.seed),
                   help="tuning seeds, comma-separated: each row is the mean over them (default: one, %(default)s)")
    p.add_argument("--eval-examples", type=int, default=t.eval_examples)
    p.add_argument("--reference", default=None,
                   help="variants that get a full fine-tuning row, comma-separated (default: all; '' none)")
    p.add_argument("--skip-zero-shot", action="store_true", help="no zero-shot rows (a quicker screen)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-file", default=None)
    p.add_argument("--dev-file", default=None)
    p.add_argument("--out", default="runs/offsite-sweep/size")
    p.add_argument("--log", default=None, help="append one JSON line per kept fraction to this file")
    p.add_argument("--note", default="", help="free text kept with each log line")
    return p.parse_args(argv)


def load_full(spec: str):
    if spec == "smollm2":
        from model.smollm2 import smollm2_hf_folder
        spec = str(smollm2_hf_folder())
    return load_model(spec)


def configs(args) -> tuple[BuildConfig, TuneConfig]:
    bcfg = BuildConfig(model=args.model, bottom=args.bottom, top=args.top, mlp_keep=args.mlp_keep,
                       distill_steps=args.distill_steps,
                       distill_lr=args.distill_lr, distill_warmup=args.distill_warmup,
                       distill_schedule=args.distill_schedule, distill_max_grad_norm=args.distill_max_grad_norm,
                       distill_gradient_weight=args.distill_gradient_weight,
                       progress=False)
    tcfg = TuneConfig(task=args.task, mode=args.mode, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                      eval_examples=args.eval_examples, progress=False, train_file=args.train_file,
                      dev_file=args.dev_file)
    return bcfg, tcfg


def seeded(tcfg: TuneConfig, seeds: list[int]) -> list[TuneConfig]:
    return [replace(tcfg, seed=s) for s in seeds]


def mean_over(runs: list[dict]) -> dict:
    """The seeds' mean of each accuracy, the median step time, and every seed's figures under "by_seed"."""
    keys = [k for k in runs[0] if k not in ("step_seconds", "seed")]
    out = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    if "step_seconds" in runs[0]:
        out["step_seconds"] = statistics.median(r["step_seconds"] for r in runs)
    return {**out, "by_seed": runs}


def tune_and_plug(full, model, positions: list[int], to_full: dict[int, int], tcfg: TuneConfig,
                  data: TaskData) -> dict:
    """Tune the adapter of `model` at `positions`; accuracy on `model` (tuned) and plugged into a copy of `full`."""
    acc = lambda m: accuracy(m, data.task, data.dev, data.pad_id, data.label_ids, tcfg.eval_batch_size)  # noqa: E731
    torch.manual_seed(tcfg.seed)
    adapter = make_adapter(model, positions, tcfg.mode, tcfg)
    record = train_adapter(adapter, data.task, data.train, tcfg, data.pad_id)
    out = {"seed": tcfg.seed, "tuned": acc(model), "step_seconds": record["step_seconds_median"],
           "mean_loss_last10": record["mean_loss_last10"]}
    if full is not None:
        scaling = adapter.lora.cfg.scaling if adapter.lora is not None else 1.0
        returned = ReturnedAdapter({"mode": tcfg.mode, "blocks": [to_full[p] for p in positions]},
                                   adapter.state(to_full), scaling)
        plugged = copy.deepcopy(full)
        apply_adapter(plugged, returned, {b: b for b in returned.blocks})
        out["plug-in"] = acc(plugged.eval())
    return out


def one_fraction(full, tok, kept: float, bcfg: BuildConfig, tcfgs: list[TuneConfig], data: TaskData, cache: dict,
                 zero_shot: bool, variants: list[str]) -> list[dict]:
    """Cut (and distill) the emulator keeping `kept` of the middle, then per variant and seed tune a copy of it and
    plug the adapter into the full model: one row per variant, the mean over the seeds."""
    t0 = time.perf_counter()
    layout = make_layout(len(family_of(full).blocks(full)), bcfg.bottom, bcfg.top, round(1 - kept, 6))
    emu, pruning = emulator_model(full, layout, tok, bcfg)
    record = distill(full, emu, layout, tok, bcfg, cache) if bcfg.distill_steps > 0 else None
    base = {"kept": kept, "kept_blocks": len(layout.emulator), "middle_blocks": len(layout.middle),
            "emulator": list(layout.emulator), "mlp_keep": bcfg.mlp_keep,
            "parameters_ratio": sum(p.numel() for p in emu.parameters()) / sum(p.numel() for p in full.parameters()),
            "distill_error": None if record is None else record["held_out_error_after"],
            "distill_error_before": None if record is None else record["held_out_error_before"],
            "distill_seconds": None if record is None else record["seconds"],
            "gradient_alignment": gradient_alignment(full, emu, layout, tok)}
    if zero_shot:
        base["emulator zero-shot"] = accuracy(emu, data.task, data.dev, data.pad_id, data.label_ids)
    rows = []
    for which in variants:
        t1 = time.perf_counter()
        res = mean_over([tune_and_plug(full, copy.deepcopy(emu),
                                       [layout.position(b) for b in trained_blocks(layout, which)],
                                       dict(enumerate(layout.kept)), tcfg, data) for tcfg in tcfgs])
        rows.append({**base, "train_blocks": which, "emulator fine-tuned": res["tuned"], "plug-in": res["plug-in"],
                     "step_seconds": res["step_seconds"], "mean_loss_last10": res["mean_loss_last10"],
                     "by_seed": res["by_seed"], "seconds": round(time.perf_counter() - t1, 1)})
    rows[0]["seconds"] = round(rows[0]["seconds"] + t1 - t0, 1)  # the cut and distillation count with the first
    return rows


def plot(rows: list[dict], refs: dict[str, dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for which, ref in refs.items():
        mine = [r for r in rows if r["train_blocks"] == which]
        tag = "" if len(refs) == 1 else f" ({which})"
        xs = [r["kept"] for r in mine]
        line, = ax.plot(xs, [100 * r["plug-in"] for r in mine], "o-", label="plug-in" + tag)
        ax.plot(xs, [100 * r["emulator fine-tuned"] for r in mine], "s--", color=line.get_color(),
                label="emulator fine-tuned" + tag)
        if "full fine-tuning" in ref:
            ax.axhline(100 * ref["full fine-tuning"], color=line.get_color(), linestyle=":",
                       label="full fine-tuning" + tag)
    zero = next((r["full model zero-shot"] for r in refs.values() if "full model zero-shot" in r), None)
    if zero is not None:
        ax.axhline(100 * zero, color="gray", linestyle="-.", label="full model zero-shot")
    ax.set_xlabel("kept fraction of the middle blocks")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def sweep_table(rows: list[dict], refs: dict[str, dict]) -> str:
    body = []
    for r in rows:
        ft = refs[r["train_blocks"]].get("full fine-tuning")
        body.append([f"{r['kept']:.2f}", f"{r['kept_blocks']}/{r['middle_blocks']}", r["train_blocks"],
                     pct(r.get("emulator zero-shot")), pct(r["emulator fine-tuned"]), pct(r["plug-in"]),
                     f"{100 * (r['plug-in'] - r['emulator fine-tuned']):+.1f}",
                     "" if ft is None else f"{100 * (r['plug-in'] - ft):+.1f}",
                     "" if r["distill_error"] is None else f"{r['distill_error']:.3f}",
                     " ".join(f"{v:.2f}" for v in r["gradient_alignment"].values()), f"{r['step_seconds']:.3f}"])
    return table(["kept", "blocks", "trains", "emu zero-shot", "emu-tuned", "plug-in", "plug - emu",
                  "plug - full FT", "distill err", "gradient cosine", "tune step s"], body)


def reference_rows(full, blocks: list[int], tcfgs: list[TuneConfig], data: TaskData, zero_shot: bool,
                   fine_tune: bool) -> dict:
    """Full zero-shot, and full fine-tuning: the same adapter blocks tuned the same way on (a copy of) the full model,
    once per seed (the mean, and each seed's figure)."""
    ref = {}
    if zero_shot:
        ref["full model zero-shot"] = accuracy(full, data.task, data.dev, data.pad_id, data.label_ids)
    if fine_tune:
        res = mean_over([tune_and_plug(None, copy.deepcopy(full), blocks, {}, tcfg, data) for tcfg in tcfgs])
        ref["full fine-tuning"], ref["full_step_seconds"] = res["tuned"], res["step_seconds"]
        ref["full fine-tuning by seed"] = {r["seed"]: r["tuned"] for r in res["by_seed"]}
    return ref


def headline(args, refs: dict[str, dict], rows: list[dict], n_dev: int, png: Path, seconds: float) -> dict:
    out = {"model": args.model, "task": args.task, "dev_examples": n_dev, "mode": args.mode,
           "distill_steps": args.distill_steps, "png": str(png), "seconds": seconds}
    for which, ref in refs.items():
        mine = [r for r in rows if r["train_blocks"] == which]
        out[which] = {**{k.replace(" ", "_").replace("-", "_"): v for k, v in ref.items()},
                      "kept": [r["kept"] for r in mine], "plug_in": [r["plug-in"] for r in mine],
                      "emulator_tuned": [r["emulator fine-tuned"] for r in mine]}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bcfg, tcfg = configs(args)
    tcfgs = seeded(tcfg, [int(s) for s in args.seeds.split(",")])
    check_config(bcfg)
    loaded = load_full(args.model)
    full, tok = loaded.model, loaded.tokenizer or T.tiny_tokenizer()
    data = task_data(args.task, tok, args.eval_examples, args.train_file, args.dev_file)
    variants = args.train_blocks.split(",")
    layout0 = make_layout(len(family_of(full).blocks(full)), bcfg.bottom, bcfg.top, 0.0)
    with_ref = variants if args.reference is None else [w for w in args.reference.split(",") if w]
    refs = {w: reference_rows(full, list(trained_blocks(layout0, w)), tcfgs, data, not args.skip_zero_shot and i == 0,
                              w in with_ref) for i, w in enumerate(variants)}
    cache: dict = {}
    rows = []
    for kept in [float(x) for x in args.sweep.split(",")]:
        for row in one_fraction(full, tok, kept, bcfg, tcfgs, data, cache, not args.skip_zero_shot, variants):
            rows.append(row)
            if args.log:
                line = {"bench": "offsite_sweep", "note": args.note, "config": vars(args),
                        **refs[row["train_blocks"]], **row}
                with open(args.log, "a") as f:
                    f.write(json.dumps(line) + "\n")
            print(f"kept {kept} ({row['train_blocks']}): emulator-tuned {pct(row['emulator fine-tuned'])}, plug-in "
                  f"{pct(row['plug-in'])} ({row['seconds']} s)", flush=True)
    print(f"{args.task} dev ({len(data.dev)} examples), adapter {args.mode}, {args.steps} steps of batch "
          f"{args.batch_size}, mean over seeds {args.seeds}; distillation {args.distill_steps} steps; " +
          "; ".join(f"{w}: " + ", ".join(f"{k} {pct(v)}" for k, v in ref.items()
                                     if isinstance(v, float) and not k.endswith("seconds"))
                    for w, ref in refs.items()))
    print(sweep_table(rows, refs))
    png = plot(rows, refs, out / "sweep.png", f"{args.model} {args.task}: offsite tuning against emulator size")
    seconds = round(time.perf_counter() - t0, 1)
    (out / "sweep.json").write_text(json.dumps({"config": vars(args), "reference": refs, "rows": rows,
                                                "seconds": seconds}, indent=1))
    result = headline(args, refs, rows, len(data.dev), png, seconds)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
