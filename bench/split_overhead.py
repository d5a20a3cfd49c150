"""Split, carried and DLoRA step time over loopback gRPC, each divided by local PEFT step time on the same batches.

    python bench/split_overhead.py [--steps 22] [--model smollm2]

Same machine, same batches, same LoRA placement (split: q,v on the edge blocks 0 and L-1; carried and DLoRA: q,v on
every block), measured side by side in one run with the steps interleaved (A, B, A, B ...) so that background load
hits both alike. The cloud is its own process (`tandem cloud serve`, as in a deployment: edge and cloud share no
interpreter lock; run in one process, the cloud's compute measured up to 30 % slower, bench/step_profile.py);
`--in-process` runs it on threads of this process instead, as `tandem demo` does. The first two steps of each are
warm-up and not counted. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tasks as T  # noqa: E402
from edge.trainer import EdgeConfig, build_edge  # noqa: E402
from tests.reference import peft_local as ref  # noqa: E402
from model.load import load_model  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def start_cloud(model: str, *extra: str):
    """`tandem cloud serve` (with the `extra` flags) in its own process on a free port, serving once it listens."""
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({"bench": TOKEN}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "cloud", "serve", "--model", model, "--tokens",
                             str(tokens), "--port", str(port), *extra], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if proc.poll() is not None:
            raise SystemExit(f"the cloud exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the cloud did not listen within 600 s")


def time_mode(model: str, loaded, port: int, mode: str, batches, task) -> dict:
    """One mode's steps interleaved with local PEFT's on the same batches; medians after two warm-up steps."""
    em, _, link = build_edge(EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=TOKEN, model=model,
                                           cloud_lora=mode), loaded=copy.deepcopy(loaded))
    pm = ref.peft_model(copy.deepcopy(loaded.model), em.lora)
    head = pm.base_model.model.get_output_embeddings()
    opt_s = torch.optim.AdamW(em.lora.parameters(), lr=1e-3)
    opt_l = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    split_t, local_t, bytes_step = [], [], []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        opt_s.zero_grad()
        loss, _ = em.loss(b)
        loss.backward()
        opt_s.step()
        t1 = time.perf_counter()
        opt_l.zero_grad()
        loss_l, _ = T.loss_from_hidden(task, ref.hidden(pm, b), b, head)
        loss_l.backward()
        opt_l.step()
        t2 = time.perf_counter()
        if i >= 2:
            split_t.append(t1 - t0)
            local_t.append(t2 - t1)
            bytes_step.append(em.cloud.last_traffic.bytes_up + em.cloud.last_traffic.bytes_down)
        print(f"{mode:>7} step {i:2d}: split {t1 - t0:6.3f}s  local PEFT {t2 - t1:6.3f}s  "
              f"loss {loss.item():.4f} vs {loss_l.item():.4f}", flush=True)
    link.close()
    return {"split_s": statistics.median(split_t), "local_peft_s": statistics.median(local_t),
            "ratio": statistics.median(split_t) / statistics.median(local_t),
            "mb_per_step": statistics.mean(bytes_step) / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=22)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--modes", default="none,carried,edge", help="--cloud-lora values to time (default: all three)")
    ap.add_argument("--in-process", action="store_true", help="the cloud on threads of this process")
    args = ap.parse_args()
    loaded = load_model(args.model)
    tok = loaded.tokenizer or T.tiny_tokenizer()
    task = T.TASKS["sst2"]
    items = T.encode(task, T.load_split("sst2", "train")[:args.steps * args.batch_size], tok)
    batches = list(T.batches(task, items, args.batch_size, tok.pad_token_id or 0, seed=0))[:args.steps]
    if args.in_process:
        from cloud.rpc import BackboneService, make_server
        svc = BackboneService(copy.deepcopy(loaded.model), {TOKEN: "bench"})
        server, port = make_server(svc, "127.0.0.1:0")
        server.start()
    else:
        cloud, port = start_cloud(args.model)

    rows = {}
    names = {"none": "split (frozen cloud)", "carried": "carried (all blocks)", "edge": "DLoRA (all blocks)"}
    for mode in args.modes.split(","):
        rows[names[mode]] = time_mode(args.model, loaded, port, mode, batches, task)
    if args.in_process:
        server.stop(0).wait()
        svc.stop()
    else:
        cloud.terminate()
        cloud.wait(60)
    print(f"\n{'path':<22}{'step s':>9}{'local PEFT s':>14}{'ratio':>8}{'MB/step':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r['split_s']:>9.3f}{r['local_peft_s']:>14.3f}{r['ratio']:>8.2f}{r['mb_per_step']:>10.1f}")
    print(json.dumps({"model": args.model, "steps_timed": args.steps - 2, "batch_size": args.batch_size,
                      "cloud": "in-process" if args.in_process else "own process",
                      **{k.split(" ")[0].lower() + "_over_local_peft": round(v["ratio"], 3) for k, v in rows.items()},
                      **{k.split(" ")[0].lower() + "_mb_per_step": round(v["mb_per_step"], 2) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
