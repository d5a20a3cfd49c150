"""The documented federation run: 8 simulated devices, 5 rounds, a Dirichlet(alpha = 0.5) split of SST-2, SmolLM2,
FedAvg of A and B (FedIT) against the exact FFA-LoRA in the same run, on the same partitions and the same cloud.

    python bench/federation.py                       # the documented run (defaults below)
    python bench/federation.py --rounds 2 --devices 4 --out runs/federation/quick

Every device trains through the one cloud backbone started by the driver (DLoRA: LoRA on q and v in every block,
computed on the device), Ray runs two devices at a time on the 2 cores. Prints the per-round tables, writes
<out>/federation.json and <out>/federation.png, and ends with one JSON line of the headline figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.federation.server_app import FederationConfig  # noqa: E402
from sim.federation.driver import FederateOptions, federate  # noqa: E402
from sim.federation.report import render  # noqa: E402


class CpuMeter:
    """CPU seconds of this process and every descendant (the cloud, Ray and its device workers), sampled every few
    seconds so workers that end are counted too. On a shared machine the wall time depends on the others' load;
    CPU seconds / cores is what the run needs of an otherwise idle machine."""

    def __init__(self, every: float = 2.0):
        import threading

        import psutil
        self.me = psutil.Process()
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.every = every
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self.seen[p.pid] = max(self.seen.get(p.pid, 0.0), t.user + t.system)
            except Exception:  # gone between listing and reading
                pass

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self._sample()

    def seconds(self) -> float:
        self._sample()
        self.stop.set()
        return sum(self.seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--strategies", default="fedavg,ffa")
    ap.add_argument("--cloud-lora", default="edge", help="edge: DLoRA (LoRA in every block); none: split")
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--eval-nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", default="runs/federation/bench")
    args = ap.parse_args()

    opts = FederateOptions(devices=args.devices, partitioner="dirichlet", alpha=args.alpha,
                           strategies=tuple(args.strategies.split(",")), cpus=args.cpus, cpus_per_device=1.0,
                           out=args.out)
    fed = FederationConfig(num_server_rounds=args.rounds, model=args.model, task=args.task, cloud_lora=args.cloud_lora,
                           local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                           eval_examples=args.eval_examples, eval_nodes=args.eval_nodes)
    load_before = os.getloadavg()
    meter = CpuMeter()
    t0 = time.time()
    summary = federate(opts, fed)
    wall = time.time() - t0
    cpu = meter.seconds()
    print(render(summary, args.out), flush=True)
    headline = {"bench": "federation", "model": args.model, "task": args.task, "devices": args.devices,
                "rounds": args.rounds, "partitioner": f"dirichlet(alpha={args.alpha})", "cloud_lora": args.cloud_lora,
                "local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr,
                "dev_examples": args.eval_examples, "wall_seconds": round(wall, 1), "cpus": os.cpu_count(),
                "cpu_seconds": round(cpu, 1), "idle_machine_seconds": round(cpu / (os.cpu_count() or 1), 1),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    for name, c in summary["comparison"].items():
        headline[name] = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in c.items()}
    rounds = summary["runs"][opts.strategies[0]]["rounds"][1:]
    if rounds:
        headline["split_bytes_per_step"] = round(rounds[-1]["split_bytes_per_step"])
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
