"""Every PEFT method and mode through the cloud, on the real model, with the same training budget.

    python bench/peft_methods.py [--steps 100] [--batch-size 8] [--eval-examples 500] [--second-task agnews]
                                 [--rows lora-split,ia3-carried,...] [--out runs/peft_methods]

One cloud (`tandem cloud serve`, its own process) serves every row in turn; each row is one edge run of
`edge.trainer.train` on SST-2 (--first-task; seed 0, the same batches for every row: the budget is --steps x
--batch-size examples), evaluated on the first --eval-examples dev examples before and after. Per row: trainable parameters,
wire bytes per step each way, round trips per step, the cloud process's peak resident memory during the row
(VmHWM, reset before each row), dev accuracy before and after, and minutes. The learning rate is each method's
usual one, not tuned here (the column says which: prompt tuning is usually run at far higher rates than LoRA).
Then the best three rows again on a second task. Prints a table, writes OUT/peft_methods.json and a PNG of the
accuracies, and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.split_overhead import TOKEN, start_cloud  # noqa: E402
from cli.report import table  # noqa: E402

ROWS = {  # name -> (flags, learning rate)
    "lora-split": (dict(peft="lora", cloud_lora="none"), 1e-3),
    "lora-dlora": (dict(peft="lora", cloud_lora="edge"), 1e-3),
    "lora-carried": (dict(peft="lora", cloud_lora="carried"), 1e-3),
    "rslora-carried": (dict(peft="lora", cloud_lora="carried", lora_rslora=True), 1e-3),
    "dora-carried": (dict(peft="lora", cloud_lora="carried", lora_dora=True), 1e-3),
    "ia3-split": (dict(peft="ia3", cloud_lora="none"), 3e-3),
    "ia3-carried": (dict(peft="ia3", cloud_lora="carried"), 3e-3),
    "adapter-split": (dict(peft="adapter", cloud_lora="none"), 1e-3),
    "adapter-dlora": (dict(peft="adapter", cloud_lora="edge"), 1e-3),
    "prompt": (dict(peft="prompt", cloud_lora="none"), 3e-2),
    "ptuning": (dict(peft="ptuning", cloud_lora="none"), 1e-3),
    "prefix-carried": (dict(peft="prefix", cloud_lora="carried"), 1e-2),  # P-tuning v2: the prefixes themselves
    "prefix-projection": (dict(peft="prefix", cloud_lora="carried", prefix_projection=512), 1e-3),  # Li & Liang
}


def hwm_kb(pid: int, reset: bool = False) -> int:
    status = Path(f"/proc/{pid}/status")
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return next(int(ln.split()[1]) for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))


def run_row(name: str, task: str, args, loaded, cloud_pid: int, port: int) -> dict:
    import copy
    from edge.config import EdgeConfig
    from edge.trainer import train
    flags, lr = ROWS[name]
    cfg = EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=TOKEN, model=args.model, task=task, lr=lr,
                        steps=args.steps, batch_size=args.batch_size, eval_examples=args.eval_examples, seed=0,
                        checkpoint_every=0, out_dir=str(Path(args.out) / task / name), name=name, **flags)
    hwm_kb(cloud_pid, reset=True)
    t0 = time.perf_counter()
    m = train(cfg, loaded=copy.deepcopy(loaded), existing="overwrite").metrics
    s = m["summary"]
    n = len(m["steps"])
    return {"row": name, "task": task, "lr": lr, "trainable": m["trainable_parameters"],
            "bytes_up_per_step": s["bytes_up_per_step"], "bytes_down_per_step": s["bytes_down_per_step"],
            "round_trips_per_step": sum(r["messages_up"] + r["messages_down"] for r in m["steps"]) / (2 * n),
            "cloud_peak_mb": hwm_kb(cloud_pid) / 1024, "acc_before": m["eval_before"]["accuracy"],
            "acc_after": m["eval_after"]["accuracy"], "step_seconds": s["step_seconds"],
            "minutes": (time.perf_counter() - t0) / 60}


def show(results: list[dict]) -> None:
    print(table(["row", "task", "lr", "trainable", "MB up/step", "MB down/step", "round trips", "cloud MB",
                 "acc before", "acc after", "s/step", "min"],
                [[r["row"], r["task"], f"{r['lr']:g}", f"{r['trainable']:,}", f"{r['bytes_up_per_step'] / 1e6:.3f}",
                  f"{r['bytes_down_per_step'] / 1e6:.3f}", f"{r['round_trips_per_step']:.0f}",
                  f"{r['cloud_peak_mb']:.0f}", f"{100 * r['acc_before']:.1f}", f"{100 * r['acc_after']:.1f}",
                  f"{r['step_seconds']:.2f}", f"{r['minutes']:.1f}"] for r in results]), flush=True)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [f"{r['row']}\n{r['task']}" for r in results]
    ax.bar(names, [100 * r["acc_after"] for r in results], label="after")
    ax.scatter(names, [100 * r["acc_before"] for r in results], color="k", zorder=3, label="before")
    ax.set_ylabel("dev accuracy (%)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--first-task", default="sst2")
    ap.add_argument("--second-task", default="agnews", help="the best three rows again on this task ('': none)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default="runs/peft_methods")
    args = ap.parse_args()
    rows = args.rows.split(",")
    if bad := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"unknown rows {', '.join(bad)}; rows: {', '.join(ROWS)}")
    from model.load import load_model
    loaded = load_model(args.model)
    proc, port = start_cloud(args.model)
    results: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def run(name: str, task: str) -> None:  # one row; the JSON file is rewritten after each (a cut run keeps them)
        print(f"--- {name} on {task}", flush=True)
        results.append(run_row(name, task, args, loaded, proc.pid, port))
        show(results)
        (out / "peft_methods.json").write_text(json.dumps({"settings": vars(args), "rows": results}, indent=1))
    try:
        for name in rows:
            run(name, args.first_task)
        for r in sorted(results, key=lambda r: -r["acc_after"])[:3] if args.second_task else []:
            run(r["row"], args.second_task)
    finally:
        proc.terminate()
        proc.wait(30)
    plot(results, out / "peft_methods.png")
    print(f"table: {out / 'peft_methods.json'}   plot: {out / 'peft_methods.png'}")
    print(json.dumps({f"{r['row']}/{r['task']}": {k: round(r[k], 4) if isinstance(r[k], float) else r[k]
                                                   for k in ("acc_after", "bytes_up_per_step", "bytes_down_per_step",
                                                             "round_trips_per_step", "trainable", "cloud_peak_mb")}
                      for r in results}))


if __name__ == "__main__":
    main()
