"""Soak: N edges train through one cloud for M minutes; errors, step-time percentiles, and the server's memory.

    python bench/soak.py [--model smollm2] [--edges 3] [--minutes 3] [--cloud-lora edge]
    python bench/soak.py --model tiny-llama --edges 2 --minutes 0.3          # a quick check

The cloud runs in a process of its own (`cloud.serve.Cloud`, as `tandem cloud serve` runs it), so the resident set
sampled every --sample-seconds is the server's alone. Each edge is a thread of this process with its own token,
session and data shard, training SST-2 with an ordinary loop until the deadline; a step that still fails after the
link's retries counts as an error and the edge goes on. The run stops by itself: the edges stop at the deadline
(a step in flight finishes, bounded by the link's timeout), the server is stopped, a watchdog ends the process if
anything hangs.

Writes <out>/soak.json and <out>/soak_rss.png (server RSS over time) and ends with one JSON line: steps, errors,
retries, p50/p99 step seconds, steps per second, server RSS at start / end / max and its growth after warm-up.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tasks as T  # noqa: E402
from edge.link import StepFailed  # noqa: E402
from edge.trainer import EdgeConfig, build_edge  # noqa: E402
from model.load import load_model  # noqa: E402


def token(i: int) -> str:
    return f"soak-edge-{i:03d}-0123456789abcdef"


# ---- the server, in its own process ----------------------------------------------------------------------------------
def serve(model: str, edges: int, threads: int, conn, stop) -> None:
    torch.set_num_threads(threads)
    from cloud.serve import Cloud, ServeConfig
    cloud = Cloud(ServeConfig(model=model, port=0, max_sessions=max(64, 2 * edges)),
                  tokens={token(i): f"edge{i}" for i in range(edges)})
    conn.send(cloud.port)
    stop.wait()
    cloud.stop(grace=5.0)


def rss_mb(pid: int) -> float:
    """Resident set of process `pid`, in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil
    return psutil.Process(pid).memory_info().rss / 2**20


# ---- the edges -------------------------------------------------------------------------------------------------------
class RetryCounter(logging.Handler):
    """Counts the link's retries (it logs a warning before each)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "retry" in record.getMessage():
            self.count += 1


class Edge(threading.Thread):
    def __init__(self, i: int, args, loaded, address: str):
        super().__init__(daemon=True, name=f"soak-edge-{i}")
        self.i, self.deadline = i, 0.0  # set when all edges start
        cfg = EdgeConfig.of(cloud=address, token=token(i), model=args.model, cloud_lora=args.cloud_lora,
                            progress=False, batch_size=args.batch_size, seed=i, shard=i, num_shards=args.edges,
                            timeout=args.step_timeout, patience=args.patience)
        self.em, tok, self.link = build_edge(cfg, loaded=copy.deepcopy(loaded))
        task = T.TASKS["sst2"]
        items = T.load_split("sst2", "train")[i::args.edges][:args.batch_size * 64]
        self.batches = list(T.batches(task, T.encode(task, items, tok), args.batch_size, tok.pad_token_id or 0,
                                      seed=i, drop_last=True))
        self.opt = torch.optim.AdamW([p for p in self.em.lora.parameters() if p.requires_grad], lr=1e-3)
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.errors: list[str] = []

    def run(self):
        n = 0
        while time.monotonic() < self.deadline:
            batch = self.batches[n % len(self.batches)]
            n += 1
            t0 = time.perf_counter()
            try:
                self.opt.zero_grad()
                loss, _ = self.em.loss(batch)
                loss.backward()
                self.opt.step()
            except StepFailed as e:
                self.errors.append(f"{e.code.name if e.code else 'ERROR'}: {e.details[:120]}")
                continue
            except Exception as e:  # noqa: BLE001 - a soak counts every failure and goes on
                self.errors.append(f"{type(e).__name__}: {str(e)[:120]}")
                continue
            self.step_seconds.append(time.perf_counter() - t0)
            self.losses.append(loss.item())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def plot(samples: list[tuple[float, float]], phases: dict, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t for t, _ in samples], [m for _, m in samples], color="#4a7ab0", lw=1.5)
    for name, t in phases.items():
        ax.axvline(t, color="#999", ls="--", lw=1)
        ax.text(t, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="#555")
    ax.set_xlabel("seconds since the server started")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--edges", type=int, default=3, help="edge clients training at once")
    ap.add_argument("--minutes", type=float, default=3.0, help="how long the edges train")
    ap.add_argument("--cloud-lora", default="edge", choices=("none", "edge"), help="edge: DLoRA; none: split")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sample-seconds", type=float, default=1.0, help="how often the server's RSS is read")
    ap.add_argument("--warmup-seconds", type=float, default=None,
                    help="RSS growth is measured from this long after the start (default: a tenth of the run)")
    ap.add_argument("--step-timeout", type=float, default=120.0, help="seconds one edge RPC may take")
    ap.add_argument("--patience", type=float, default=30.0, help="seconds an edge retries a failing step")
    ap.add_argument("--server-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="torch threads of the server process")
    ap.add_argument("--out", default="runs/bench/soak")
    return ap.parse_args()


def start_watchdog(hard_limit: float) -> None:
    """Whatever hangs (loading, the run, stopping), the process ends after `hard_limit` seconds."""
    watchdog = threading.Timer(hard_limit, lambda: (print(json.dumps(
        {"bench": "soak", "error": f"watchdog: did not stop in {hard_limit:.0f}s"}), flush=True), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()


def start_sampler(samples: list[tuple[float, float]], pid: int, t_start: float, every: float) -> threading.Event:
    """Appends (seconds since t_start, RSS of `pid`) to `samples` every `every` seconds until the event is set."""
    sampling = threading.Event()

    def sampler():
        while not sampling.wait(every):
            try:
                samples.append((time.monotonic() - t_start, rss_mb(pid)))
            except Exception:  # noqa: BLE001 - the server is gone; the run reports it
                return
    threading.Thread(target=sampler, daemon=True).start()
    return sampling


def train_edges(edges: list[Edge], duration: float, step_timeout: float) -> tuple[float, float, list[str]]:
    """Every edge trains for `duration` seconds from t0; (t0, t1 when they had stopped, the edges that hung). The
    links of the edges that stopped are closed."""
    t0 = time.monotonic()
    for e in edges:
        e.deadline = t0 + duration
        e.start()
    for e in edges:
        e.join(timeout=max(1.0, e.deadline - time.monotonic()) + step_timeout * 2 + 30)
    t1 = time.monotonic()
    hung = [e.name for e in edges if e.is_alive()]
    for e in edges:
        if not e.is_alive():
            e.link.close()
    return t0, t1, hung


def stop_server(server, stop) -> None:
    stop.set()
    server.join(60)
    if server.is_alive():
        server.terminate()
        server.join(10)


def report(args, edges: list[Edge], samples, phases: dict, warmup: float, t0: float, t1: float, hung: list[str],
           retries: int, server_exitcode, out: Path) -> dict:
    """The run's result, the final JSON line: steps, errors, step-time percentiles, the server's RSS."""
    steps = [s for e in edges for s in e.step_seconds]
    errors = [err for e in edges for err in e.errors]
    train = [(t, m) for t, m in samples if t >= phases["edges train"]]
    base = [m for t, m in train if t >= phases["edges train"] + warmup] or [m for _, m in train]
    result = {
        "bench": "soak", "model": args.model, "edges": args.edges, "minutes": args.minutes,
        "cloud_lora": args.cloud_lora, "batch_size": args.batch_size,
        "steps": len(steps), "errors": len(errors), "retries": retries, "hung_edges": hung,
        "steps_per_second": round(len(steps) / (t1 - t0), 3) if t1 > t0 else None,
        "p50_step_s": percentile(steps, 0.50), "p99_step_s": percentile(steps, 0.99),
        "mean_step_s": statistics.fmean(steps) if steps else None,
        "losses_finite": all(torch.isfinite(torch.tensor(e.losses)).all().item() for e in edges if e.losses),
        "rss_start_mb": round(train[0][1], 1) if train else None,
        "rss_end_mb": round(train[-1][1], 1) if train else None,
        "rss_max_mb": round(max(m for _, m in train), 1) if train else None,
        "rss_growth_after_warmup_mb": round(base[-1] - base[0], 1) if base else None,
        "server_exitcode": server_exitcode,
        "png": str(out / "soak_rss.png"),
        "first_errors": errors[:5],
    }
    for k in ("p50_step_s", "p99_step_s", "mean_step_s"):
        result[k] = round(result[k], 4) if result[k] is not None else None
    return result


def main():
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    warmup = duration / 10 if args.warmup_seconds is None else args.warmup_seconds
    start_watchdog(duration + 600 + 60 * args.edges)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.server_threads))
    retries = RetryCounter()
    logging.getLogger("tandem.edge").addHandler(retries)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    server = ctx.Process(target=serve, args=(args.model, args.edges, args.server_threads, child, stop), daemon=True)
    t_start = time.monotonic()
    server.start()
    samples: list[tuple[float, float]] = []
    sampling = start_sampler(samples, server.pid, t_start, args.sample_seconds)

    if not parent.poll(600):
        raise SystemExit("the server did not start within 600s")
    port = parent.recv()
    phases = {"serving": time.monotonic() - t_start}
    loaded = load_model(args.model)
    edges = [Edge(i, args, loaded, f"127.0.0.1:{port}") for i in range(args.edges)]  # each connects, opens a session
    t0, t1, hung = train_edges(edges, duration, args.step_timeout)
    phases["edges train"] = t0 - t_start
    phases["deadline"] = t0 + duration - t_start
    time.sleep(2 * args.sample_seconds)  # a sample or two after the edges left
    sampling.set()
    stop_server(server, stop)

    result = report(args, edges, samples, phases, warmup, t0, t1, hung, retries.count, server.exitcode, out)
    plot(samples, phases, out / "soak_rss.png", f"{args.model}: {args.edges} edges for {args.minutes:g} min, "
         f"{result['steps']} steps, {result['errors']} errors")
    (out / "soak.json").write_text(json.dumps({**result, "rss_samples": samples}, indent=1))
    print(json.dumps(result), flush=True)
    sys.exit(0 if not hung and server.exitcode == 0 else 1)


if __name__ == "__main__":
    main()
