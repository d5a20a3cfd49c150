"""Where one remote step's time goes, per mode, against local PEFT (LoRA on every block) on the same batches.

    python bench/step_profile.py [--steps 12] [--modes none,carried,edge] [--model smollm2]

Cloud and edge run in this process (the cloud on its own threads, as in bench/split_overhead.py); the first two
steps are warm-up. Per step:

  edge wall            the step on the edge: forward, backward, optimizer
  edge waits           the edge blocked on the cloud's next message (StepStream.recv)
  cloud compute        what the cloud reports (Hidden / InputGrad cloud_seconds: its forward and backward)
  wire + hops          edge waits - cloud compute: gRPC, the event loop, thread hand-offs, the cloud's codec
  encode / decode      protocol.tensors.encode / decode, both sides, summed over threads (wrapped and timed)
  edge compute         edge wall - edge waits - the edge's own encode and decode

Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import cloud.step_runner as runner  # noqa: E402
import cloud.stream as cloud_stream  # noqa: E402
import edge.remote as remote  # noqa: E402
import tasks as T  # noqa: E402
from cloud.rpc import BackboneService, make_server  # noqa: E402
from cloud.sessions import CloudConfig  # noqa: E402
from edge.trainer import EdgeConfig, build_edge  # noqa: E402
from model.load import load_model  # noqa: E402
from tests.reference import peft_local as ref  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
SPENT: dict[str, float] = defaultdict(float)
_lock = threading.Lock()


def timed(owner, name: str, part: str) -> None:
    fn = getattr(owner, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            with _lock:
                SPENT[part] += time.perf_counter() - t0
    setattr(owner, name, wrapper)


def instrument() -> None:
    for side, mods in (("edge", (remote,)), ("cloud", (runner, cloud_stream))):  # who encodes / decodes
        for mod in mods:
            for name in ("encode", "decode"):
                if hasattr(mod, name):
                    timed(mod, name, f"{side} {name}")


def profile_mode(loaded, spec: str, port: int, mode: str, batches) -> tuple:
    em, _, link = build_edge(EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=TOKEN, model=spec, cloud_lora=mode,
                                           progress=False), loaded=copy.deepcopy(loaded))
    opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-3)
    wall = waits = cloud = 0.0
    for i, b in enumerate(batches):
        if i == 2:
            SPENT.clear()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = em.loss(b)
        loss.backward()
        opt.step()
        if i >= 2:
            wall += time.perf_counter() - t0
            waits += em.cloud.last_traffic.wait_seconds
            cloud += em.cloud.last_traffic.cloud_seconds
    link.close()
    n = len(batches) - 2
    p = {k: v / n for k, v in SPENT.items()}
    row = {"edge wall": wall / n, "edge waits": waits / n, "cloud compute": cloud / n,
           "wire + hops": (waits - cloud) / n, **p}
    row["edge compute"] = row["edge wall"] - row["edge waits"] - p.get("edge encode", 0) - p.get("edge decode", 0)
    return row, em.lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--modes", default="none,carried,edge")
    args = ap.parse_args()
    loaded = load_model(args.model)
    tok = loaded.tokenizer or T.tiny_tokenizer()
    task = T.TASKS["sst2"]
    items = T.encode(task, T.load_split("sst2", "train")[:args.steps * 8], tok)
    batches = list(T.batches(task, items, 8, tok.pad_token_id or 0, seed=0))[:args.steps]
    instrument()
    svc = BackboneService(copy.deepcopy(loaded.model), {TOKEN: "bench"}, CloudConfig())
    server, port = make_server(svc, "127.0.0.1:0")
    server.start()
    rows, lora = {}, None
    for m in args.modes.split(","):
        rows[m], got = profile_mode(loaded, args.model, port, m, batches)
        lora = got if m != "none" else lora or got
    server.stop(0).wait()
    svc.stop()
    pm = ref.peft_model(copy.deepcopy(loaded.model), lora)  # the last mode's placement (all blocks unless split only)
    head = pm.base_model.model.get_output_embeddings()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    local = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = T.loss_from_hidden(task, ref.hidden(pm, b), b, head)
        loss.backward()
        opt.step()
        if i >= 2:
            local.append(time.perf_counter() - t0)
    local_s = sum(local) / len(local)
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"\nseconds per step (local PEFT, same batches: {local_s:.3f} s)")
    print(f"{'part':<16}" + "".join(f"{m:>10}" for m in rows))
    for k in names:
        print(f"{k:<16}" + "".join(f"{r.get(k, 0.0):>10.3f}" for r in rows.values()))
    print(f"{'x local PEFT':<16}" + "".join(f"{r['edge wall'] / local_s:>10.2f}" for r in rows.values()))
    print(json.dumps({"model": args.model, "local_peft_s": round(local_s, 4),
                      **{m: {"over_local_peft": round(r["edge wall"] / local_s, 3),
                             **{k.replace(" + ", "_").replace(" ", "_"): round(v, 4) for k, v in r.items()}}
                         for m, r in rows.items()}}))


if __name__ == "__main__":
    main()
