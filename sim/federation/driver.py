"""`tandem federate`: a Tandem federation in Flower's simulation engine, on one machine.

    partition   the task's training set is split among the simulated devices with a flwr-datasets partitioner
                (IID, Dirichlet over labels with `alpha`, or pathological: `labels_per_device` labels each), from the
                local data only; each device's part is written to <out>/partitions/client-<i>.jsonl
    cloud       one backbone service is started here; every simulated device trains through it
    rounds      for each strategy (e.g. FedAvg, then FFA-LoRA, on the same partitions and the same cloud) the same
                ServerApp and ClientApp that `flwr run .` runs (cloud/federation, edge/federation) run in
                `flwr.simulation.run_simulation`; Ray runs at most cpus / cpus_per_device devices at a time
    report      per round: train loss, the global adapter's dev accuracy, Flower bytes down/up and the adapter's
                payload, split traffic per step and in total, per device and summed; the merge's deviation from the
                true average update. Terminal tables, <out>/federation.json, <out>/federation.png.

The ServerApp of each strategy writes <out>/<strategy>/report.json (and the global adapter in PEFT format to
<out>/<strategy>/adapter); `render` rebuilds the tables and the plot from those files.

A run fails fast, with FederationFailed (one line: the cause and the fix), instead of hanging: Ray must be up within
`backend_timeout` seconds (a watchdog in this thread), the devices must answer within the ServerApp's
`device_timeout`, and a simulation the backend broke stops its ServerApp at once. Flower runs in a daemon thread, so
the ServerApp thread it starts is a daemon too: nothing left waiting can keep the process alive.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tasks as T
from cloud.federation.server_app import FederationConfig, backbone, run_federation
from sim.federation.failures import SHUTDOWN_GRACE, FederationFailed, abandon, explain, ray_started, real_error
from sim.federation.report import compare, load_summary, render  # the latter two re-exported

PARTITIONERS = ("iid", "dirichlet", "pathological")


@dataclass
class FederateOptions:
    """What the simulation adds to a federation's own settings (FederationConfig)."""
    devices: int = 8
    partitioner: str = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration: small = each device sees few labels
    labels_per_device: int = 1  # pathological
    min_partition_size: int = 10
    partition_seed: int = 42
    strategies: tuple[str, ...] = ("fedavg", "ffa")
    cpus: int = 2  # CPUs Ray may use ...
    cpus_per_device: float = 1.0  # ... and each simulated device reserves: at most cpus / cpus_per_device at once
    backend_timeout: float = 120.0  # seconds the simulation backend (Ray) may take to start
    out: str = "runs/federation"
    quiet: bool = True


# ---- partitions ---------------------------------------------------------------------------------------------------

def make_partitioner(how: str, devices: int, *, alpha: float = 0.5, labels_per_device: int = 1,
                     min_partition_size: int = 10, seed: int = 42):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner
    if how == "iid":
        return IidPartitioner(devices)
    if how == "dirichlet":
        return DirichletPartitioner(devices, "label", alpha, min_partition_size=min_partition_size,
                                    self_balancing=False, shuffle=True, seed=seed)
    if how == "pathological":
        return PathologicalPartitioner(devices, "label", labels_per_device,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {how!r}")


def partition(rows: list[dict], devices: int, how: str = "dirichlet", **kwargs) -> list[list[dict]]:
    """Split `rows` (each with an int `label`) among `devices` with a flwr-datasets partitioner; no hub access."""
    from datasets import Dataset
    partitioner = make_partitioner(how, devices, **kwargs)
    partitioner.dataset = Dataset.from_list(rows)
    return [partitioner.load_partition(i).to_list() for i in range(devices)]


def write_partitions(parts: list[list[dict]], folder: str | Path) -> list[dict]:
    """client-<i>.jsonl per device (the ClientApp's `partition-dir`); returns each part's size and label counts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, rows in enumerate(parts):
        with open(folder / f"client-{i}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        summary.append({"device": i, "examples": len(rows),
                        "labels": dict(sorted(Counter(int(r["label"]) for r in rows).items()))})
    (folder / "partitions.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---- the run ------------------------------------------------------------------------------------------------------

def backend_config(opts: FederateOptions) -> dict:
    return {"client_resources": {"num_cpus": opts.cpus_per_device, "num_gpus": 0.0},
            "init_args": {"num_cpus": opts.cpus, "num_gpus": 0, "logging_level": "ERROR",
                          "log_to_driver": not opts.quiet}}


def simulate(cfg: FederationConfig, opts: FederateOptions, client_app) -> None:
    """One federation in Flower's simulation engine, watched. Raises FederationFailed when Ray has not started
    within opts.backend_timeout (the ServerApp is stopped, the backend given SHUTDOWN_GRACE to stop), when the
    devices do not answer within cfg.device_timeout, or when the simulation breaks."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.app import Context
    from flwr.simulation import run_simulation

    stop, server_done, done = threading.Event(), threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, context, cfg, stop)
        except BaseException as ex:
            errors.setdefault("server", ex)
            raise
        finally:
            server_done.set()

    def run() -> None:
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=opts.devices,
                           backend_config=backend_config(opts), verbose_logging=False)
        except BaseException as ex:
            errors["simulation"] = ex
        finally:
            stop.set()  # a backend that broke leaves the ServerApp waiting for replies: end it
            done.set()

    # a daemon thread: Flower's ServerApp thread, started from it, is a daemon too
    threading.Thread(target=run, name=f"tandem-simulation-{cfg.label or cfg.strategy}", daemon=True).start()
    _watch(opts, stop, server_done, done, errors)


def _watch(opts: FederateOptions, stop: threading.Event, server_done: threading.Event, done: threading.Event,
           errors: dict[str, BaseException]) -> None:
    """Wait for the simulation started by `simulate` to end; raise FederationFailed for what went wrong."""
    t0 = time.monotonic()
    backend_up, server_ended = False, None
    try:
        while not done.wait(0.25):
            now = time.monotonic()
            if not backend_up:
                backend_up = ray_started()
                if not backend_up and now - t0 > opts.backend_timeout:
                    stop.set()
                    abandon(done, SHUTDOWN_GRACE)
                    if (error := real_error(errors)) is not None:  # Ray failed by itself meanwhile, say
                        raise FederationFailed(explain(error, opts)) from error
                    raise FederationFailed(
                        f"the simulation backend (Ray) did not start within --backend-timeout "
                        f"{opts.backend_timeout:g}s; raise --backend-timeout (a busy machine starts Ray slowly), or "
                        f"check that Ray can start here: python -c 'import ray; ray.init()'")
            if server_done.is_set():
                server_ended = server_ended or now
                if now - server_ended > SHUTDOWN_GRACE:
                    abandon(done, 0)
                    raise FederationFailed(
                        f"the simulation backend (Ray) did not shut down within {SHUTDOWN_GRACE:g}s of the ServerApp's "
                        f"end" + (f" ({explain(errors['server'], opts)})" if "server" in errors else ""))
    except KeyboardInterrupt:
        stop.set()
        abandon(done, SHUTDOWN_GRACE)
        raise
    error = real_error(errors) or errors.get("server") or errors.get("simulation")
    if error is not None:
        raise FederationFailed(explain(error, opts)) from error


def federate(opts: FederateOptions, fed: FederationConfig) -> dict:
    """Partition, start the cloud, run every strategy's federation, write and return the summary."""
    from cloud.serve import Cloud, ServeConfig
    from edge.federation.client_app import app as client_app

    t_start = time.time()
    out = Path(opts.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parent.parent)  # Ray's workers import the apps from here
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)

    rows = T.load_split(fed.task, "train")
    parts = partition(rows, opts.devices, opts.partitioner, alpha=opts.alpha,
                      labels_per_device=opts.labels_per_device, min_partition_size=opts.min_partition_size,
                      seed=opts.partition_seed)
    partitions = write_partitions(parts, out / "partitions")

    token = secrets.token_urlsafe(32)
    cloud = Cloud(ServeConfig(model=fed.model, port=0), model=backbone(fed.model), tokens={token: "federation"})
    reports = {}
    try:
        for i, name in enumerate(opts.strategies):
            cfg = replace(fed, strategy=name, label=name, cloud_address=cloud.address, cloud_token=token,
                          partition_dir=str(out / "partitions"), out_dir=str(out / name), min_nodes=opts.devices,
                          eval_initial=fed.eval_initial and i == 0)
            simulate(cfg, opts, client_app)
            reports[name] = json.loads((out / name / "report.json").read_text())
    finally:
        cloud.stop()
    first = reports[opts.strategies[0]]["rounds"][0]
    for name in opts.strategies[1:]:  # every strategy starts from the same adapter: one zero-shot evaluation
        if reports[name]["rounds"][0].get("dev_accuracy") is None and first.get("dev_accuracy") is not None:
            reports[name]["rounds"][0].update({k: first[k] for k in ("dev_accuracy", "dev_examples")}, shared=True)
    summary = {"options": asdict(opts), "federation": {k: v for k, v in asdict(fed).items() if k != "cloud_token"},
               "partitions": partitions, "runs": reports, "comparison": compare(reports),
               "seconds": time.time() - t_start}
    (out / "federation.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["FederateOptions", "FederationConfig", "FederationFailed", "simulate", "partition", "write_partitions",
           "federate", "render", "compare", "load_summary", "PARTITIONERS"]
