"""Offsite tuning end to end on the real model, and what it costs the data owner, in one run.

    1. cloud      build the bundle (adapter blocks + layer-dropped, optionally distilled emulator), seal it to the owner
    2. owner      open and verify it, tune the adapter on SST-2 through the emulator, seal the adapter back
    3. cloud      open and verify the adapter, plug it in, evaluate the paper's five rows on the same dev examples
    4. ONNX       export the owner's model and the plugged model, compare onnxruntime with PyTorch (max |logits|)
    5. cost       tuning step time and peak memory on the emulator vs on the full model, each variant in its own
                  subprocess (fresh process, same batches, same loader), alternated so both see the same machine

Peak memory is the process's resident high-water mark (Linux VmHWM) while tuning, minus the resident memory just
before the model is loaded (imports done, training data tokenized): the model's weights plus everything tuning adds
(activations, gradients, optimizer state). The high-water mark is reset (/proc/self/clear_refs) after loading, so
loading transients do not count.

    python bench/offsite.py --out runs/offsite [--more-tasks mrpc]    (defaults: BuildConfig's and TuneConfig's)

Ends by printing one line holding a JSON object of the headline figures (also written to OUT/offsite.json)."""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tasks as T  # noqa: E402
from cli.report import table  # noqa: E402
from emulator.build import BuildConfig, build  # noqa: E402
from emulator.bundle import (ADAPTER_FORMAT, BUNDLE_FORMAT, Layout, compact_config, load_bundle,  # noqa: E402
                             verify_dir)
from emulator.onnx_export import export_onnx, max_abs_diff, session  # noqa: E402
from emulator.plug import differences, format_table, load_adapter, offsite_table  # noqa: E402
from emulator.transport import open_sealed_dir, seal_dir  # noqa: E402
from emulator.tune import TuneConfig, make_adapter, median, task_data, train_adapter, trained_blocks, tune  # noqa: E402
from model.load import load_model  # noqa: E402
from privacy.security.seal import generate_identity, load_identity, load_public  # noqa: E402


def status_kb(field: str) -> int:
    return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith(field + ":"))


def reset_peak() -> None:
    """Give freed memory back to the OS and restart the high-water mark from the current resident size."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def child(args) -> None:
    """One variant's tuning cost, in this fresh process. Prints one JSON line."""
    from transformers import AutoModelForCausalLM
    bundle = Path(args.bundle)
    manifest = verify_dir(bundle, BUNDLE_FORMAT)
    tok = T.tiny_tokenizer()
    if (bundle / "tokenizer").is_dir():  # as load_bundle reads it, without loading the weights before the baseline
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
        tok.pad_token = tok.pad_token or tok.eos_token
    data = task_data(args.task, tok, 1)
    with torch.device("meta"):  # import the model's code now, so that only weights and tuning count below
        AutoModelForCausalLM.from_config(compact_config(manifest["config"], Layout.from_json(manifest["layout"])))
    gc.collect()
    base_kb = status_kb("VmRSS")
    emu = load_bundle(bundle)
    cfg = TuneConfig(task=args.task, mode=args.mode, steps=args.warmup + args.measure_steps, progress=False,
                     batch_size=args.batch_size)
    reset_peak()
    loaded_kb = status_kb("VmRSS")
    torch.manual_seed(0)
    adapter = make_adapter(emu.model, [emu.layout.position(b) for b in trained_blocks(emu.layout, args.train_blocks)],
                           args.mode, cfg)
    rec = train_adapter(adapter, data.task, data.train, cfg, data.pad_id)
    peak_kb = status_kb("VmHWM")
    print(json.dumps({"variant": args.child, "blocks": emu.model.config.num_hidden_layers,
                      "step_seconds": rec["step_seconds"][args.warmup:],
                      "step_seconds_median": median(rec["step_seconds"][args.warmup:]),
                      "weights_mb": (loaded_kb - base_kb) / 1024, "peak_mb": (peak_kb - base_kb) / 1024,
                      "tuning_mb": (peak_kb - loaded_kb) / 1024}))


def measure(args, bundles: dict[str, Path]) -> dict:
    """Run the variants' subprocesses alternately, `rounds` times each; medians over rounds."""
    runs: dict[str, list[dict]] = {v: [] for v in bundles}
    for r in range(args.rounds):
        for variant, bundle in bundles.items():
            cmd = [sys.executable, __file__, "--child", variant, "--bundle", str(bundle), "--task", args.task,
                   "--mode", args.mode, "--train-blocks", args.train_blocks, "--batch-size", str(args.batch_size),
                   "--measure-steps", str(args.measure_steps), "--warmup", str(args.warmup), "--threads",
                   str(args.threads)]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  cost round {r + 1}/{args.rounds} {variant}: {runs[variant][-1]['step_seconds_median']:.3f} "
                  f"s/step, peak {runs[variant][-1]['peak_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = {v: {"blocks": rs[0]["blocks"],
                   "step_seconds": median([r["step_seconds_median"] for r in rs]),
                   "peak_mb": median([r["peak_mb"] for r in rs]),
                   "weights_mb": median([r["weights_mb"] for r in rs]),
                   "tuning_mb": median([r["tuning_mb"] for r in rs]), "runs": rs} for v, rs in runs.items()}
    e, f = summary["emulator"], summary["full"]
    summary["step_time_ratio"] = e["step_seconds"] / f["step_seconds"]
    summary["peak_memory_ratio"] = e["peak_mb"] / f["peak_mb"]
    return summary


def cost_table(c: dict) -> str:
    rows = [[v, str(c[v]["blocks"]), f"{c[v]['step_seconds']:.3f}", f"{c[v]['peak_mb']:.0f}",
             f"{c[v]['weights_mb']:.0f}", f"{c[v]['tuning_mb']:.0f}"] for v in ("emulator", "full")]
    rows.append(["emulator / full", "", f"{c['step_time_ratio']:.2f}", f"{c['peak_memory_ratio']:.2f}", "", ""])
    return table(["tuning on", "blocks", "step s (median)", "peak MB", "of which weights", "tuning adds"], rows)


@torch.no_grad()
def onnx_check(model, out_dir: Path, tokenizer, data) -> float:
    """Export, then the largest |onnxruntime - PyTorch| logit over real tokens of a padded dev batch."""
    path = export_onnx(model, out_dir, tokenizer, data.task.name)
    batch = next(T.batches(data.task, data.dev[:8], 8, data.pad_id))
    return max_abs_diff(model, session(path), batch.input_ids, batch.attention_mask)


def parse_args() -> argparse.Namespace:
    b, t = BuildConfig(), TuneConfig()  # the defaults are the library's (emulator/build.py, emulator/tune.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default=t.task, help="the task of the table and of the cost measurement")
    p.add_argument("--more-tasks", default="", help="comma-separated tasks that get a table of their own too "
                                                    "(same bundle, their own adapter), e.g. mrpc")
    for name, value in (("bottom", b.bottom), ("top", b.top), ("drop", b.drop), ("mlp-keep", b.mlp_keep),
                        ("distill-steps", b.distill_steps), ("distill-lr", b.distill_lr), ("distill-warmup", b.distill_warmup),
                        ("distill-schedule", b.distill_schedule), ("mode", t.mode), ("train-blocks", t.train_blocks),
                        ("steps", t.steps), ("batch-size", t.batch_size), ("eval-examples", t.eval_examples)):
        p.add_argument("--" + name, type=type(value), default=value)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--measure-steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="cost subprocesses per variant, alternated")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared, oversubscribed machine OpenMP spin-waits cost more than it gives)")
    p.add_argument("--skip-table", action="store_true", help="only the cost measurement")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--out", default="runs/offsite")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    return p.parse_args()


def make_identities(keys: Path):
    """Fresh identities (signing + encryption keys) for the cloud and the data owner, under `keys`."""
    for name in ("cloud", "owner"):
        generate_identity(keys, name)
    return load_identity(keys, "cloud"), load_identity(keys, "owner")


def cloud_build(args, out: Path, keys: Path, cloud):
    """Step 1: build the bundle and seal it to the owner; build the full-model bundle for the cost measurement."""
    print(f"[1/5] cloud: building the bundle (drop {args.drop}, MLP keep {args.mlp_keep}, distillation {args.distill_steps} steps)", flush=True)
    loaded = load_model(args.model)
    tok = loaded.tokenizer or T.tiny_tokenizer()  # tiny test models have none
    bcfg = BuildConfig(model=args.model, bottom=args.bottom, top=args.top, drop=args.drop, mlp_keep=args.mlp_keep,
                       distill_steps=args.distill_steps, distill_lr=args.distill_lr,
                       distill_warmup=args.distill_warmup, distill_schedule=args.distill_schedule)
    manifest = build(bcfg, out / "cloud" / "bundle", loaded=loaded)
    seal_dir(out / "cloud" / "bundle", out / "cloud" / "bundle.sealed", BUNDLE_FORMAT, cloud, load_public(keys, "owner"))
    # the full-model variant of the cost measurement: same loader, nothing dropped, nothing distilled
    build(BuildConfig(model=args.model, bottom=args.bottom, top=args.top, drop=0.0, distill_steps=0,
                      alignment_batches=0, quality_task=""), out / "cloud" / "full_bundle", loaded=loaded)
    return loaded, tok, manifest


def owner_tune(args, out: Path, keys: Path, owner, task: str) -> dict:
    """Step 2: the data owner opens and verifies the bundle, tunes the adapter, seals it back to the cloud."""
    print(f"[2/5] data owner: verify the bundle, tune the adapter through the emulator ({task})", flush=True)
    if not (out / "owner" / "bundle").exists():
        open_sealed_dir(out / "cloud" / "bundle.sealed", out / "owner" / "bundle", BUNDLE_FORMAT,
                        load_public(keys, "cloud"), owner)
    tcfg = TuneConfig(task=task, mode=args.mode, train_blocks=args.train_blocks, lr=args.lr, steps=args.steps,
                      batch_size=args.batch_size, eval_examples=args.eval_examples, eval_before=False, eval_after=False)
    mine = out / "owner" / task
    tuned = tune(tcfg, out / "owner" / "bundle", mine / "adapter")
    seal_dir(mine / "adapter", mine / "adapter.sealed", ADAPTER_FORMAT, owner, load_public(keys, "cloud"))
    return tuned


def cloud_plug(args, out: Path, keys: Path, cloud, full, tok, task: str) -> dict:
    """Step 3: the cloud opens and verifies the adapter, plugs it in, evaluates the paper's table."""
    print(f"[3/5] cloud: verify the adapter, plug it in, evaluate the table ({task})", flush=True)
    mine = out / "cloud" / task
    open_sealed_dir(out / "owner" / task / "adapter.sealed", mine / "adapter", ADAPTER_FORMAT,
                    load_public(keys, "owner"), cloud)
    return offsite_table(full, tok, load_bundle(out / "cloud" / "bundle"), load_adapter(mine / "adapter"), task,
                         args.eval_examples)


def onnx_step(args, out: Path, loaded, tok, tuned: dict, plugged) -> dict:
    """Step 4: export the owner's model and the plugged model as ONNX; the largest logit difference of each."""
    print("[4/5] ONNX: export both models, compare onnxruntime with PyTorch", flush=True)
    data = task_data(args.task, tok, args.eval_examples)
    owner_model = tuned["_adapter"]
    owner_model.merge()
    diffs = {
        "owner (adapter + emulator)": onnx_check(owner_model.model, out / "owner" / "onnx", loaded.tokenizer, data),
        "plugged full model": onnx_check(plugged, out / "cloud" / "onnx", loaded.tokenizer, data)}
    print(table(["ONNX model", "max |ort - torch| logits"], [[k, f"{v:.2e}"] for k, v in diffs.items()]), flush=True)
    return diffs


def tune_and_plug(args, out: Path, keys: Path, cloud, owner, loaded, tok, results: dict) -> None:
    """Steps 2-4 for each task (the table; the ONNX check on the first), recorded into `results`."""
    results["tables"] = {}
    for task in [args.task] + [t for t in args.more_tasks.split(",") if t]:
        tuned = owner_tune(args, out, keys, owner, task)
        # the reference run tunes the full model in place: each task gets the untouched model
        res = cloud_plug(args, out, keys, cloud, copy.deepcopy(loaded.model), tok, task)
        plugged = res.pop("_plugged")
        results["tables"][task] = res
        print(format_table(res), flush=True)
        if task == args.task and not args.skip_onnx:
            results["onnx_max_abs_diff"] = onnx_step(args, out, loaded, tok, tuned, plugged)
        del plugged, tuned
        gc.collect()


def sizes(out: Path) -> dict:
    """What travels to the data owner, in MB: the bundle's weights, the whole bundle folder, the sealed file."""
    b = out / "cloud" / "bundle"
    return {"weights_mb": (b / "weights.safetensors").stat().st_size / 1e6, "sealed_mb":
            (out / "cloud" / "bundle.sealed").stat().st_size / 1e6,
            "bundle_mb": sum(f.stat().st_size for f in b.rglob("*") if f.is_file()) / 1e6}


def table_figures(res: dict) -> dict:
    """A task's rows as a flat dict: the accuracy of each row and the two differences the paper reads."""
    both = {**res["rows"], **differences(res["rows"])}
    return {k.replace(" - ", "_minus_").replace(" ", "_").replace("-", "_"): round(v, 4) for k, v in both.items()}


def headline(args, manifest: dict, results: dict, cost: dict) -> dict:
    """The headline figures, printed as the run's last line."""
    tables, q = results.get("tables", {}), manifest.get("quality", {})
    first = tables.get(args.task, {})
    return {"model": args.model, "task": args.task, "dev_examples": first.get("dev_examples"),
            "mode": args.mode, "drop_ratio": manifest["drop_ratio"], "kept_blocks": len(manifest["layout"]["emulator"]),
            "mlp_keep": args.mlp_keep,
            "distill_steps": args.distill_steps, "tune_steps": args.steps,
            "gradient_alignment": manifest["gradient_alignment"].get("bundle"),
            "bundle_parameters_ratio": round(manifest["parameters"]["bundle"] / manifest["parameters"]["full"], 3),
            **(table_figures(first) if first else {}),
            "more_tasks": {t: table_figures(r) for t, r in tables.items() if t != args.task},
            "step_time_ratio": round(cost["step_time_ratio"], 3),
            "peak_memory_ratio": round(cost["peak_memory_ratio"], 3),
            **{k: round(v, 1) for k, v in results["sizes"].items()},
            "quality": {"zero_shot_gap": q.get("zero_shot", {}).get("gap"), "distillation_error":
                        q.get("distillation_error"), "perplexity_ratio": q.get("language_model", {}).get("perplexity_ratio")},
            "onnx_max_abs_diff": max(results["onnx_max_abs_diff"].values()) if "onnx_max_abs_diff" in results
            else None, "seconds": results["seconds"]}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: choose a new --out")
    t_start = time.perf_counter()
    keys = out / "keys"
    cloud, owner = make_identities(keys)
    loaded, tok, manifest = cloud_build(args, out, keys, cloud)
    results: dict = {"config": vars(args), "sizes": sizes(out),
                      "bundle": {k: manifest[k] for k in ("layout", "drop_ratio", "mlp_pruning", "distillation", "parameters",
                                                          "quality")}}
    print(table(["bundle", "MB"], [[k.removesuffix("_mb"), f"{v:.1f}"] for k, v in results["sizes"].items()]),
          flush=True)
    if not args.skip_table:
        tune_and_plug(args, out, keys, cloud, owner, loaded, tok, results)
    del loaded
    gc.collect()

    print(f"[5/5] cost: {args.rounds} x {args.measure_steps} steps per variant, each in its own process", flush=True)
    cost = measure(args, {"emulator": out / "cloud" / "bundle", "full": out / "cloud" / "full_bundle"})
    results["cost"] = cost
    print(cost_table(cost), flush=True)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "offsite.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(headline(args, manifest, results, cost)))

if __name__ == "__main__":
    main()
