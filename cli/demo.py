"""`tandem demo`: the whole product in one command, on the real model and data.

An embedded cloud backbone service on loopback (gRPC, bearer tokens, TLS with --tls) and N edge clients, each
with its own shard of SST-2 train. Each edge trains LoRA through the cloud (DLoRA by default: the LoRA of every
block lives and trains on the edge), is evaluated on the dev set before and after, and saves its adapter in PEFT
format. Prints a table per client, writes metrics JSON and a loss-curve PNG.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class DemoConfig:
    model: str = "smollm2"
    task: str = "sst2"
    clients: int = 2
    steps: int = 80  # per client
    batch_size: int = 8
    cloud_lora: str = "edge"  # DLoRA; "none" = frozen-cloud split training
    k: int = 1
    m: int = 1
    lr: float = 1e-3
    wire_up: str = "fp32"
    wire_down: str = "fp32"
    eval_examples: int = 500
    tls: bool = False
    out: str = "runs/demo"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def run_demo(cfg: DemoConfig) -> dict:
    from cloud.server import Cloud, ServeConfig
    from cli.report import plot_losses, print_client_table
    from edge.trainer import EdgeConfig, train
    from model.load import load_model
    from privacy.security.tokens import make_tokens

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"[1/4] loading {cfg.model} ...", flush=True)
    loaded = load_model(cfg.model, device=cfg.device)
    names = [f"edge-{i}" for i in range(cfg.clients)]
    tokens = make_tokens(out / "tokens.json", names)  # client -> token
    tls_dir = None
    if cfg.tls:
        from privacy.security.certs import make_certs
        tls_dir = str(out / "certs")
        make_certs(tls_dir, clients=tuple(names))
    cloud = Cloud(ServeConfig(model=cfg.model, host="127.0.0.1", port=0, tls_dir=tls_dir, device=cfg.device),
                  model=copy.deepcopy(loaded.model), tokens={tok: name for name, tok in tokens.items()})
    host = "localhost" if cfg.tls else "127.0.0.1"
    print(f"[2/4] cloud backbone serving on {host}:{cloud.port} ({'TLS' if cfg.tls else 'plaintext'} loopback); "
          f"{cfg.clients} edges, {'DLoRA' if cfg.cloud_lora == 'edge' else 'split'} mode", flush=True)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def client(i: int):
        ecfg = EdgeConfig(cloud=f"{host}:{cloud.port}", token=tokens[names[i]], tls_dir=tls_dir,
                          client_name=names[i], model=cfg.model, task=cfg.task, shard=i, num_shards=cfg.clients,
                          k=cfg.k, m=cfg.m, cloud_lora=cfg.cloud_lora, lr=cfg.lr, steps=cfg.steps,
                          batch_size=cfg.batch_size, seed=cfg.seed + i, wire_up=cfg.wire_up, wire_down=cfg.wire_down,
                          eval_examples=cfg.eval_examples, out_dir=str(out / names[i]), device=cfg.device,
                          eval_before=i == 0,  # zero-shot is the base model's (LoRA B starts at 0): measured once
                          dtype=cfg.dtype, name=names[i], checkpoint_every=0, progress_row=i)
        try:
            m = train(ecfg, loaded=copy.deepcopy(loaded))
            m.pop("_edge_model")
            results[names[i]] = m
        except BaseException as e:  # surfaced after join
            errors.append(e)

    print(f"[3/4] training {cfg.steps} steps per client (batch {cfg.batch_size}), dev eval on "
          f"{cfg.eval_examples} examples before and after", flush=True)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(cfg.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    cloud.stop()
    if errors:
        raise errors[0]
    for n in names[1:]:
        results[n]["eval_before"] = dict(results[names[0]]["eval_before"], shared_with=names[0])
    runs = [(n, results[n]) for n in names]
    wall = time.perf_counter() - t_start
    print(f"\n[4/4] done in {wall / 60:.1f} min", flush=True)
    print_client_table(runs)
    summary = {"config": asdict(cfg), "wall_seconds": wall, "clients": results}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    plot_losses(runs, out / "loss.png", f"{cfg.task}: {'DLoRA' if cfg.cloud_lora == 'edge' else 'split'} training "
                                        f"through the cloud")
    print(f"\nmetrics: {out / 'metrics.json'}   loss curve: {out / 'loss.png'}   adapters: "
          f"{', '.join(str(out / n / 'adapter') for n in names)}")
    headline = {n: {"acc_before": m.get("eval_before", {}).get("accuracy"),
                    "acc_after": m.get("eval_after", {}).get("accuracy"),
                    "bytes_up_per_step": m["summary"]["bytes_up_per_step"],
                    "bytes_down_per_step": m["summary"]["bytes_down_per_step"]} for n, m in runs}
    print(json.dumps({"wall_seconds": round(wall, 1), "clients": headline}))
    return summary
