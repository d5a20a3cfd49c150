"""A quantized frozen cloud (`tandem cloud serve --quantize int8|int4`) against the fp32 cloud: what the cloud's
blocks take, what the cloud process holds, how long a training step takes, and the dev accuracy after the same
training budget (same batches, seed and LoRA initialisation; the edge is fp32 in every run).

    python bench/quantized_cloud.py [--model smollm2] [--steps 100] [--batch-size 8] [--lr 1e-3] [--eval-examples 500]
                                    [--seeds 0,1,2]

Each cloud is `tandem cloud serve` in its own process on loopback (so its RSS is its own: /proc/<pid>/status at
start and after training); the blocks' weight bytes are cloud/quantize.py's count of the same quantization done
here. The edge trains with `edge.trainer.train` (default --cloud-lora carried, the demo's mode: LoRA on every
block, the cloud blocks' LoRA over their quantized base, QLoRA's setting). The goal: int8 and int4 within 1 point
of fp32's dev accuracy, weights at most 0.3 (int8) and 0.2 (int4) of fp32. With several seeds (each seed its own
batches and LoRA initialisation, the same for every cloud) the goal is judged on the mean over seeds, and the table
shows each mode's mean, its spread over seeds and its mean paired difference from fp32. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cloud.quantize import MemoryReport, MiB, quantize_blocks  # noqa: E402
from edge.trainer import EdgeConfig, train  # noqa: E402
from model.load import load_model  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
GOAL = {"int8": 0.3, "int4": 0.2}  # weight budget, as a fraction of fp32


def start_cloud(spec: str, mode: str, threads: int, tokens: Path, port: int) -> subprocess.Popen:
    """`tandem cloud serve --quantize mode`, returned once it prints its start line (it serves then)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "cloud", "serve", "--model", spec, "--quantize", mode,
                             "--tokens", str(tokens), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("tandem cloud: serving"):
            print(f"  {line.strip()}", flush=True)
            return proc
    raise SystemExit(f"the {mode} cloud exited with {proc.wait()} before serving")


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(args, loaded, mode: str, report: MemoryReport, seed: int, tokens: Path) -> dict:
    """One training run against a `--quantize mode` cloud; `report` is that quantization's weight count."""
    port = free_port()
    proc = start_cloud(args.model, mode, args.threads, tokens, port)
    try:
        rss_start = rss_mib(proc.pid)
        t0 = time.perf_counter()
        cfg = EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=TOKEN, model=args.model, task="sst2",
                            cloud_lora=args.cloud_lora, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=seed, eval_examples=args.eval_examples, progress=False)
        metrics = train(cfg, loaded=copy.deepcopy(loaded)).metrics
        rss_end, rss_peak = rss_mib(proc.pid), rss_mib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(60)
    steps = [r["step_seconds"] for r in metrics["steps"]]
    return dict(weight_mib=report.after / MiB, fp32_mib=report.before / MiB, ratio=report.ratio,
                rss_start_mib=rss_start, rss_end_mib=rss_end, rss_peak_mib=rss_peak,
                step_seconds=statistics.median(steps[2:] or steps), run_seconds=time.perf_counter() - t0,
                acc_before=metrics["eval_before"]["accuracy"], acc_after=metrics["eval_after"]["accuracy"],
                last_loss=metrics["summary"]["mean_loss_last10"])


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per mode: the runs' median resources, and dev accuracy after training as mean, spread (sample standard
    deviation over seeds, 0 for one seed) and the mean of its paired difference from fp32 on the same seed."""
    fp = runs.get("none")
    out = {}
    for mode, by_seed in runs.items():
        acc = [r["acc_after"] for r in by_seed.values()]
        row = {k: statistics.median(r[k] for r in by_seed.values())
               for k in ("weight_mib", "ratio", "rss_start_mib", "rss_end_mib", "step_seconds")}
        row.update(acc_before=statistics.mean(r["acc_before"] for r in by_seed.values()),
                   acc_after=statistics.mean(acc), acc_spread=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                   seeds=sorted(by_seed))
        if fp:
            row["vs_fp32"] = statistics.mean(r["acc_after"] - fp[s]["acc_after"] for s, r in by_seed.items())
        out[mode] = row
    return out


def table(rows: dict[str, dict]) -> str:
    head = (f"{'cloud':6} {'block weights':>14} {'of fp32':>8} {'RSS start':>10} {'RSS end':>8} {'s/step':>7} "
            f"{'dev before':>10} {'dev after (mean ± sd)':>22} {'vs fp32':>8}")
    lines = [head, "-" * len(head)]
    for mode, r in rows.items():
        gap = f"{100 * r['vs_fp32']:+.1f} pt" if "vs_fp32" in r else "-"
        lines.append(f"{mode:6} {r['weight_mib']:10.1f} MiB {r['ratio']:8.3f} {r['rss_start_mib']:6.0f} MiB "
                     f"{r['rss_end_mib']:4.0f} MiB {r['step_seconds']:7.2f} {100 * r['acc_before']:9.1f}% "
                     f"{100 * r['acc_after']:13.1f}% ± {100 * r['acc_spread']:3.1f} {gap:>8}")
    return "\n".join(lines)


def goals(rows: dict[str, dict]) -> dict:
    return {m: {"within_1pt": abs(rows[m]["vs_fp32"]) <= 0.01, "weights_within_budget": rows[m]["ratio"] <= b}
            for m, b in GOAL.items() if m in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--modes", default="none,int8,int4", help="comma-separated --quantize values; none = fp32")
    ap.add_argument("--cloud-lora", default="carried", choices=("none", "edge", "carried"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every mode runs every seed")
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the edge and of the cloud each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    tokens = Path(tempfile.mkdtemp(prefix="tandem-bench-")) / "tokens.json"
    tokens.write_text(json.dumps({"bench": TOKEN}))
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    runs: dict[str, dict[int, dict]] = {m: {} for m in modes}
    # the same quantization the cloud does, counted once per mode (a seed changes the training, not the weights)
    reports = {m: quantize_blocks(copy.deepcopy(loaded.model), m) for m in modes}
    for i, (seed, mode) in enumerate((s, m) for s in seeds for m in modes):
        print(f"[{i + 1}/{len(seeds) * len(modes)}] {mode}: {args.steps} steps of {args.batch_size}, lr {args.lr}, "
              f"seed {seed}", flush=True)
        runs[mode][seed] = run_mode(args, loaded, mode, reports[mode], seed, tokens)
        print(f"  {json.dumps(runs[mode][seed])}", flush=True)
    rows = summarize(runs)
    print(table(rows))
    head = dict(model=args.model, cloud_lora=args.cloud_lora, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, seeds=seeds, eval_examples=args.eval_examples, modes=rows,
                runs={m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()})
    if "none" in rows:
        head["goals"] = goals(rows)
    print(json.dumps(head))


if __name__ == "__main__":
    main()
