"""Validate the cost simulator against real training on the rate-limited testbed: predicted vs measured bytes and
time per step, for split and DLoRA on SmolLM2, at several link rates.

    python bench/sim_validation.py                       # 10, 50, 200 Mbit/s; split and DLoRA; ~10 minutes
    python bench/sim_validation.py --rates 50 --paths split --steps 3

How (all real, nothing fitted):
  1. calibrate this machine once (sim/calibrate.py: GEMM, one decoder-block fwd+bwd microbenchmark at a fixed shape,
     memory, codec, gRPC loopback round trip); the `here` profile uses only these figures, for every case
  2. build the testbed (sim/testbed.py): cloud and edge in their own network namespaces, one veth link rate-limited
     both ways with tc tbf; start `tandem cloud serve` (SmolLM2) in the cloud namespace
  3. for each rate (tc qdisc replace: the cloud keeps running) and path: `tandem edge train` in the edge namespace
     (SST-2, batch B, k = m = 1, fp32 wire), metrics JSON per step
  4. predict every step from its real shape (the edge's batches are rebuilt with its tokenizer and seed, and the
     predicted payload must equal the measured one exactly), then compare bytes and time per step; the first
     `--warmup` steps (lazy initialisation, TCP slow start) are left out of both means
The last line printed is one JSON object with the headline figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm: no progress bars from model loading

from sim.calibrate import Calibration, calibrate, load_calibration  # noqa: E402
from sim.costmodel import Workload, predict  # noqa: E402
from sim.profiles import here, testbed_link  # noqa: E402
from sim.shape import load_shape  # noqa: E402
from sim.testbed import Testbed, TestbedConfig, permitted  # noqa: E402

TOKEN = "sim-validation-token-0123456789abcdef"
PORT = 50071


def edge_batch_shapes(model: str, batch: int, steps: int, seed: int = 0) -> list[int]:
    """Padded length of each batch the edge trains on (its first epoch: tasks.batches with its seed, full batches)."""
    import tasks as T
    from edge.data import load_items
    from edge.trainer import EdgeConfig
    from model.load import load_model
    tok = load_model(model, with_tokenizer=True).tokenizer
    cfg = EdgeConfig.of(task="sst2", batch_size=batch, seed=seed)
    items = load_items(cfg, tok, "train")
    out = []
    for b in T.batches(T.TASKS["sst2"], items, batch, tok.pad_token_id, seed=seed, drop_last=True):
        out.append(b.input_ids.shape[1])
        if len(out) == steps:
            return out
    return out


def run_edge(tb: Testbed, path: str, steps: int, batch: int, model: str, out: Path, env: dict) -> dict:
    argv = [sys.executable, "-m", "cli.main", "edge", "train", "--cloud", f"{tb.cloud_ip(0)}:{PORT}", "--token", TOKEN,
            "--model", model, "--task", "sst2", "--steps", str(steps), "--batch-size", str(batch), "--k", "1",
            "--m", "1", "--cloud-lora", "none" if path == "split" else "edge", "--wire-up", "fp32", "--wire-down",
            "fp32", "--no-eval-before", "--no-eval-after", "--no-progress", "--metrics-out", str(out)]
    r = tb.run(tb.edge_ns[0], argv, timeout=1800, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"edge train failed ({path}):\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="10,50,200", help="link rates in Mbit/s")
    ap.add_argument("--paths", default="split,dlora")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the time means")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the calibration and both processes (0: torch's default). One thread "
                         "each: on a shared machine, others' work then slows us in proportion instead of stalling "
                         "OpenMP barriers")
    ap.add_argument("--calibration", default=None, help="use this calibration JSON instead of measuring now")
    ap.add_argument("--prefix", default="tandem")
    return ap.parse_args(argv)


def process_env(threads: int) -> dict:
    """The environment of the cloud and edge processes; with `threads`, this process and both use that many."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if threads:
        import torch
        torch.set_num_threads(threads)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def compare_steps(recs: list[dict], preds: list, warmup: int) -> dict:
    """Means of predicted and measured bytes and times per step, leaving out the first `warmup` steps."""
    timed = list(zip(recs, preds))[warmup:]
    return {
        "steps": len(timed),
        "bytes_pred": mean(p.bytes_total for _, p in timed),
        "bytes_meas": mean(r["bytes_up"] + r["bytes_down"] for r, _ in timed),
        "step_pred": mean(p.step_s for _, p in timed),
        "step_meas": mean(r["step_seconds"] for r, _ in timed),
        "edge_pred": mean(p.edge.seconds for _, p in timed),
        "edge_meas": mean(r["edge_seconds"] for r, _ in timed),
        "rest_pred": mean(p.step_s - p.edge.seconds for _, p in timed),
        "rest_meas": mean(r["step_seconds"] - r["edge_seconds"] for r, _ in timed),
        "network_pred": mean(p.transfer_s + p.codec_s + p.latency_s for _, p in timed),
        "cloud_pred": mean(p.cloud.seconds for _, p in timed),
        "cloud_meas": mean(r["cloud_seconds"] for r, _ in timed),
    }


def measure(tb: Testbed, path: str, rate: float, link, shape, dev, seqs: list[int], args, tmp: Path,
            env: dict) -> dict:
    """One real run of `path` at `rate`, each step predicted from its real shape: one row of the table."""
    t0 = time.time()
    load = os.getloadavg()[0]
    metrics = run_edge(tb, path, args.steps, args.batch, args.model, tmp / f"{path}-{rate:g}.json", env)
    recs = metrics["steps"]
    preds = [predict(shape, path, Workload(batch=args.batch, seq=seq, step_index=r["step"]), dev, dev,
                     link) for r, seq in zip(recs, seqs)]
    for r, p in zip(recs, preds):  # the rebuilt batches are the ones the edge sent
        assert (p.payload_up, p.payload_down) == (r["payload_up"], r["payload_down"]), (r, p.path)
    row = {"rate_mbit": rate, "path": path, **compare_steps(recs, preds, args.warmup),
           "load_avg": load, "wall_s": time.time() - t0}
    row["bytes_err"] = row["bytes_pred"] / row["bytes_meas"] - 1
    row["step_err"] = row["step_pred"] / row["step_meas"] - 1
    print(f"  {path:<6} {rate:>5g} Mbit/s: step predicted {row['step_pred']:.3f} s, measured "
          f"{row['step_meas']:.3f} s ({row['step_err']:+.1%}); bytes {row['bytes_err']:+.4%}; "
          f"load {load:.1f}", flush=True)
    return row


def run_all(args, rates: list[float], paths: list[str], shape, dev, cal: Calibration, seqs: list[int],
            env: dict) -> list[dict]:
    """Start the testbed and the cloud once, then measure every path at every rate."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tokens.json").write_text(json.dumps({"sim-validation": TOKEN}))
        with Testbed(TestbedConfig(edges=1, rate_mbit=rates[0], prefix=args.prefix)) as tb:
            log = open(tmp / "cloud.log", "w")
            cloud = tb.popen(tb.cloud_ns, [sys.executable, "-m", "cli.main", "cloud", "serve", "--model", args.model,
                                           "--host", "0.0.0.0", "--port", str(PORT), "--tokens",
                                           str(tmp / "tokens.json")], env=env, stdout=log, stderr=log)
            tb.wait_port(0, PORT, timeout=600, proc=cloud)
            for rate in rates:
                tb.set_rate(rate)
                link = testbed_link(rate, cal)
                for path in paths:
                    rows.append(measure(tb, path, rate, link, shape, dev, seqs, args, tmp, env))
    return rows


def print_table(rows: list[dict], dev, cal: Calibration, warmup: int) -> None:
    print()
    print(f"{'path':<7}{'Mbit/s':>7}{'MB/step pred':>14}{'meas':>10}{'err':>9}{'step s pred':>13}{'meas':>9}"
          f"{'err':>8}{'edge s p/m':>14}{'cloud+net s p/m':>18}{'(net p)':>9}{'load':>6}")
    for r in rows:
        print(f"{r['path']:<7}{r['rate_mbit']:>7g}{r['bytes_pred'] / 1e6:>14.3f}{r['bytes_meas'] / 1e6:>10.3f}"
              f"{r['bytes_err']:>9.3%}{r['step_pred']:>13.3f}{r['step_meas']:>9.3f}{r['step_err']:>+8.1%}"
              f"{r['edge_pred']:>7.3f}/{r['edge_meas']:<6.3f}{r['rest_pred']:>9.3f}/{r['rest_meas']:<8.3f}"
              f"{r['network_pred']:>9.3f}{r['load_avg']:>6.1f}")
    print(f"\ncompute: {dev.flops / 1e9:.0f} GFLOP/s (decoder-block microbenchmark; the bare GEMM rate is "
          f"{cal.matmul_flops / 1e9:.0f}); rtt {cal.grpc_rtt_s * 1e6:.0f} us; codec {cal.codec_bytes_per_s / 1e9:.2f}"
          f" GB/s; time means leave out the first {warmup} step(s). 'load' = 1-minute load average of this "
          "shared machine when the run started.")


def main(argv=None) -> dict:
    args = parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    paths = args.paths.split(",")

    ok, why = permitted()
    if not ok:
        print(f"skipped: the network testbed is not permitted here: {why}")
        print(json.dumps({"skipped": why}))
        return {"skipped": why}
    env = process_env(args.threads)

    shape = load_shape(args.model)
    if args.calibration:
        cal: Calibration = load_calibration(args.calibration)
    else:
        cal = calibrate(shape.name)
    print("calibration:", cal.summary())
    dev = here("block", cal)
    seqs = edge_batch_shapes(args.model, args.batch, args.steps)
    print(f"padded lengths of the {args.steps} SST-2 batches (batch {args.batch}): {seqs}")

    rows = run_all(args, rates, paths, shape, dev, cal, seqs, env)

    after = None
    if not args.calibration:  # the same microbenchmarks again: how much this shared machine drifted meanwhile
        after = calibrate(shape.name)
        print("calibration after the runs (not used for predictions):", after.summary())
    print_table(rows, dev, cal, args.warmup)
    headline = {"max_abs_bytes_error": max(abs(r["bytes_err"]) for r in rows),
                "max_abs_step_time_error": max(abs(r["step_err"]) for r in rows),
                "within_15pct": all(abs(r["step_err"]) <= 0.15 for r in rows),
                "block_gflops": dev.flops / 1e9, "gemm_gflops": cal.matmul_flops / 1e9,
                "block_gflops_after": after.block_flops / 1e9 if after else None,
                "rows": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
