"""Many edges on one cloud: aggregate training tokens/s, step latency and cloud busy time, batching on and off.

    python bench/multi_tenant.py [--edges 1,2,4,8] [--steps 6] [--modes none,carried] [--model smollm2]

The cloud runs in this process (BackboneService on loopback gRPC, `batching` on or off); each edge is its own
process (`--worker`), loads the model, waits until all are ready, then trains `--steps` steps of SST-2 (batch 8,
its own shard) through the cloud with AdamW. Per configuration (mode x batching x edges):

  tokens/s     real (unpadded) training tokens of every edge's steps after its first, over the wall time from the
               first of those steps' starts to the last one's end
  p50 / p95    one step's latency on an edge (forward + backward + optimizer), after its first step
  cloud busy   the cloud compute seconds every session reports (batched compute is shared out by tokens), over
               that wall time; above 1 when unbatched steps compute in parallel threads
  x 1 edge     tokens/s over the same mode and batching setting's one-edge row

Edges use one torch thread each, the cloud the rest of the cores. Table, `<out>/multi_tenant.png` and a JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token-0123456789abcdef"


def worker(args) -> None:
    """One edge: load, say ready, wait for `go` on stdin, train, print one JSON line of its step times."""
    import torch
    torch.set_num_threads(1)
    import tasks as T
    from edge.data import load_items
    from edge.trainer import EdgeConfig, build_edge
    cfg = EdgeConfig.of(cloud=args.address, token=TOKEN, model=args.model, cloud_lora=args.mode, shard=args.shard,
                        num_shards=args.num_shards, batch_size=8, progress=False)
    em, tok, link = build_edge(cfg)
    task = T.resolve_task("sst2")
    items = load_items(cfg, tok, "train")
    batches = list(T.batches(task, items, 8, tok.pad_token_id, seed=args.shard))[:args.steps]
    opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-3)
    print("ready", flush=True)
    sys.stdin.readline()
    steps = []
    for b in batches:
        t0 = time.time()
        opt.zero_grad()
        loss, _ = em.loss(b)
        loss.backward()
        opt.step()
        steps.append({"start": t0, "end": time.time(), "tokens": int(b.attention_mask.sum()),
                      "cloud_s": em.cloud.last_traffic.cloud_seconds})
    link.close()
    print(json.dumps({"steps": steps}), flush=True)


def run_config(address: str, model: str, mode: str, n: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--address", address, "--model", model,
                               "--mode", mode, "--shard", str(i), "--num-shards", str(max(n, 2)),
                               "--steps", str(steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for i in range(n)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"an edge failed to start (exit {p.wait()})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.wait(600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    timed = [s for r in reports for s in r["steps"][1:]]
    wall = max(s["end"] for s in timed) - min(s["start"] for s in timed)
    lat = sorted(s["end"] - s["start"] for s in timed)
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / wall, "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
            "cloud_busy": sum(s["cloud_s"] for s in timed) / wall, "steps_timed": len(timed)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in dict.fromkeys((r["mode"], r["batching"]) for r in rows):
        sel = [r for r in rows if (r["mode"], r["batching"]) == key]
        ax.plot([r["edges"] for r in sel], [r["tokens_per_s"] for r in sel], marker="o",
                label=f"{key[0]}, batching {key[1]}")
    ax.set_xlabel("edges on one cloud")
    ax.set_ylabel("training tokens / s (all edges)")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict]) -> None:
    """Each row's ratio to its one-edge row, and the table."""
    for r in rows:
        one = next(o for o in rows if (o["mode"], o["batching"], o["edges"]) == (r["mode"], r["batching"], 1))
        r["x_one_edge"] = r["tokens_per_s"] / one["tokens_per_s"]
    print(f"\n{'mode':>8} {'batching':>8} {'edges':>5} {'tokens/s':>9} {'x 1 edge':>8} {'p50 s':>6} {'p95 s':>6} "
          f"{'cloud busy':>10}")
    for r in rows:
        print(f"{r['mode']:>8} {r['batching']:>8} {r['edges']:>5} {r['tokens_per_s']:>9.1f} "
              f"{r['x_one_edge']:>8.2f} {r['p50_s']:>6.2f} {r['p95_s']:>6.2f} {r['cloud_busy']:>10.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--edges", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--modes", default="none,carried")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--address")
    ap.add_argument("--mode")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--num-shards", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import torch
    from cloud.rpc import BackboneService, make_server
    from cloud.sessions import CloudConfig
    from model.load import load_model
    model = args.model
    if model == "smollm2":  # the dense folder loads in seconds in each edge process; same weights, same fingerprint
        from model.smollm2 import smollm2_hf_folder
        model = str(smollm2_hf_folder())
    backbone = load_model(model, with_tokenizer=False).model
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    rows = []
    for batching in ("on", "off"):
        svc = BackboneService(copy.deepcopy(backbone), {TOKEN: "bench"},
                              CloudConfig(batching=batching, max_sessions_per_client=64, max_streams_per_client=64,
                                          max_steps_per_client=64, max_steps_per_second=1000.0))
        server, port = make_server(svc, "127.0.0.1:0")
        server.start()
        try:
            for mode in args.modes.split(","):
                for n in map(int, args.edges.split(",")):
                    r = run_config(f"127.0.0.1:{port}", model, mode, n, args.steps)
                    rows.append({"mode": mode, "batching": batching, "edges": n, **r})
                    print(f"{mode:>8} batching {batching:<3} {n} edges: "
                          f"{r['tokens_per_s']:7.1f} tokens/s, p50 {r['p50_s']:.2f}s, p95 {r['p95_s']:.2f}s, "
                          f"cloud busy {r['cloud_busy']:.2f}", flush=True)
        finally:
            svc.stop()
            server.stop(0).wait()
    report(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "multi_tenant.png")
    pick = lambda mode, batching, n: next((r for r in rows if (r["mode"], r["batching"], r["edges"]) ==  # noqa: E731
                                           (mode, batching, n)), None)
    head = {}
    for mode in args.modes.split(","):
        on4, off4 = pick(mode, "on", 4), pick(mode, "off", 4)
        if on4 and off4:
            head[f"{mode}_4_edges_x_one_batching_on"] = round(on4["x_one_edge"], 3)
            head[f"{mode}_4_edges_on_over_off"] = round(on4["tokens_per_s"] / off4["tokens_per_s"], 3)
    print(json.dumps({"model": args.model, "steps_per_edge": args.steps, "cores": os.cpu_count(), **head,
                      "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                      "plot": str(out / "multi_tenant.png")}))


if __name__ == "__main__":
    main()
