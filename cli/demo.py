"""`tandem demo`: the whole product in one command, on the real model and data.

An embedded cloud backbone service on loopback (gRPC, bearer tokens, TLS with --tls) and N edge clients, each
with its own shard of SST-2 train. Each edge trains LoRA on every block through the cloud, is evaluated on the dev
set before and after, and saves its adapter in PEFT format. Prints a table per client, writes metrics JSON and a
loss-curve PNG.

The default mode is the carried one (the cloud blocks' LoRA weights ride each step; weights and optimizer stay on
the edge): it trains exactly what DLoRA trains (tests/test_split_equivalence.py: both equal local PEFT), with about
6 % of DLoRA's bytes on these settings (tests/test_sim_wire.py) and 2 instead of 58 round trips per step.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge.config import Wire
from model.tuners import METHODS
from protocol.step import CloudLoRA


MODE_NAMES = {"carried": "carried LoRA (weights ride each step)", "edge": "DLoRA (LoRA computed on the edge)",
              "none": "split (frozen cloud)"}


@dataclass
class DemoConfig:
    model: str = "smollm2"  # backbone spec: smollm2, tiny-llama, tiny-gpt2 or a Hugging Face model folder
    task: str = "sst2"  # the task (tasks.TASKS); each edge trains on its shard of its training set
    clients: int = 2  # edge clients, each in its own thread
    steps: int = 80  # training steps per client
    batch_size: int = 8  # training examples per step
    cloud_lora: CloudLoRA = "carried"  # carried: LoRA weights ride each step; edge: DLoRA; none: frozen split
    peft: str = field(default="lora", metadata={"choices": tuple(METHODS)})  # the PEFT method (model/tuners/)
    k: int = 1  # blocks at the bottom of the model that run on the edge
    m: int = 1  # blocks at the top of the model that run on the edge
    lr: float = 1e-3  # AdamW learning rate
    wire_up: Wire = "fp32"  # dtype of what the edges send
    wire_down: Wire = "fp32"  # dtype of what the cloud sends back
    eval_examples: int = 500  # dev examples evaluated before (once) and after training (each client)
    tls: bool = False  # TLS on the loopback link, with certificates made in --out
    out: str = "runs/demo"  # metrics.json, loss.png, tokens and each client's adapter go here
    seed: int = 0  # client i uses seed + i
    device: str = "cpu"  # torch device of the cloud and the edges
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16")})  # edges' weights


def run_demo(cfg: DemoConfig) -> dict:
    from cloud.serve import Cloud, ServeConfig
    from edge.trainer import train
    from model.load import load_model
    from privacy.security.tokens import make_tokens

    from edge.methods import check_method
    check_method(edge_config(cfg, 0, "127.0.0.1:0", "", None))  # a bad --peft / --cloud-lora: before anything loads
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
          f"{cfg.clients} edges, mode {MODE_NAMES[cfg.cloud_lora]}", flush=True)
    results: dict[str, dict] = {n: {} for n in names}  # in client order
    errors: list[BaseException] = []

    def client(i: int):
        ecfg = edge_config(cfg, i, f"{host}:{cloud.port}", tokens[names[i]], tls_dir)
        try:
            results[names[i]] = train(ecfg, loaded=copy.deepcopy(loaded), existing="overwrite").metrics
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
    for n in names[1:] if zero_shot_is_shared(cfg) else ():
        results[n]["eval_before"] = dict(results[names[0]]["eval_before"], shared_with=names[0])
    return report(cfg, results, time.perf_counter() - t_start)


def edge_config(cfg: DemoConfig, i: int, address: str, token: str, tls_dir: str | None):
    """Client i's config: its own shard, seed, token and output folder."""
    from edge.config import EdgeConfig
    name = f"edge-{i}"
    return EdgeConfig.of(cloud=address, token=token, tls_dir=tls_dir, client_name=name, model=cfg.model,
                         task=cfg.task, shard=i, num_shards=cfg.clients, k=cfg.k, m=cfg.m, cloud_lora=cfg.cloud_lora,
                         lr=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed + i,
                         wire_up=cfg.wire_up, wire_down=cfg.wire_down, eval_examples=cfg.eval_examples,
                         out_dir=str(Path(cfg.out) / name), device=cfg.device,
                         eval_before=i == 0 or not zero_shot_is_shared(cfg), peft=cfg.peft,
                         dtype=cfg.dtype, name=name, checkpoint_every=0, progress_row=i)


def zero_shot_is_shared(cfg: DemoConfig) -> bool:
    """A site method starts as the base model (LoRA's B = 0, (IA)³'s vectors = 1): one zero-shot evaluation serves
    every client. An input method's random virtual tokens change the model before training: each client's own."""
    return METHODS[cfg.peft].kind == "sites"


def report(cfg: DemoConfig, results: dict[str, dict], wall: float) -> dict:
    """The table, metrics.json, loss.png, and the headline as the last line (JSON)."""
    from cli.report import plot_losses, print_client_table
    out, names = Path(cfg.out), list(results)
    runs = [(n, results[n]) for n in names]
    print(f"\n[4/4] done in {wall / 60:.1f} min", flush=True)
    print_client_table(runs)
    summary = {"config": asdict(cfg), "wall_seconds": wall, "clients": results}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    print(f"mode: {MODE_NAMES[cfg.cloud_lora]}, --peft {cfg.peft}")
    plot_losses(runs, out / "loss.png", f"{cfg.task}: {MODE_NAMES[cfg.cloud_lora]}, through the cloud")
    print(f"\nmetrics: {out / 'metrics.json'}   loss curve: {out / 'loss.png'}   adapters: "
          f"{', '.join(str(out / n / 'adapter') for n in names)}")
    headline = {n: {"acc_before": m.get("eval_before", {}).get("accuracy"),
                    "acc_after": m.get("eval_after", {}).get("accuracy"),
                    "bytes_up_per_step": m["summary"]["bytes_up_per_step"],
                    "bytes_down_per_step": m["summary"]["bytes_down_per_step"]} for n, m in runs}
    print(json.dumps({"wall_seconds": round(wall, 1), "mode": cfg.cloud_lora, "peft": cfg.peft, "clients": headline}))
    return summary
