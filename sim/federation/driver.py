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
import logging
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tasks as T
from cloud.federation.server_app import (DevicesTimeout, FederationConfig, FederationStopped, backbone,
                                         run_federation)

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


class FederationFailed(RuntimeError):
    """A federation that could not run; the message names the cause and the fix, in one line."""


SHUTDOWN_GRACE = 30.0  # seconds a stopped simulation gets to shut its backend down


def _ray_processes() -> list[int]:
    """Ray's processes among this process's descendants (gcs_server, raylet, its agents and workers)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])  # pid (comm) state ppid ...
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("/ray/" in a or a.startswith("ray::") or Path(a).name in ("raylet", "gcs_server") for a in argv):
            found.append(pid)
    return found


def _abandon(done: threading.Event, grace: float) -> None:
    """Give a stopped simulation `grace` seconds to end. One still running then (Ray stuck in its start, say) is left
    to its daemon thread, muted so that it does not talk over the failure, and Ray's processes are killed."""
    if done.wait(grace):
        return
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    import signal
    for pid in _ray_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _ray_started() -> bool:
    import ray
    return ray.is_initialized()


def _causes(ex: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while ex is not None and ex not in chain:
        chain.append(ex)
        ex = ex.__cause__ or ex.__context__
    return chain


def explain(ex: BaseException, opts: FederateOptions) -> str:
    """One line for a failed simulation: what broke, and what to change."""
    chain = _causes(ex)
    for e in chain:
        if isinstance(e, DevicesTimeout):
            return f"the simulated devices did not come up: {e}"
    text = " | ".join(str(e) for e in chain)
    if "ActorPool is empty" in text:
        return (f"the simulation backend (Ray) cannot host a single device: each one reserves --cpus-per-device "
                f"{opts.cpus_per_device:g} CPUs of the --cpus {opts.cpus:g} Ray may use; lower --cpus-per-device or "
                f"raise --cpus")
    if "timed out during startup" in text or "gcs_server_port" in text:
        part = "node" if "timed out during startup" in text else "GCS server"
        return (f"the simulation backend (Ray) did not start: its {part} timed out during startup (an overloaded "
                f"machine); retry when the machine is less busy, or with fewer --cpus")
    root = chain[-1]
    return f"the simulation failed: {type(root).__name__}: {root}"


def _real_error(errors: dict[str, BaseException]) -> BaseException | None:
    """What broke a simulation: the ServerApp's error, else the simulation's, unless it only says it was stopped."""
    for key in ("server", "simulation"):
        ex = errors.get(key)
        if ex is not None and not any(isinstance(e, FederationStopped) for e in _causes(ex)):
            return ex
    return None


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
    t0 = time.monotonic()
    backend_up, server_ended = False, None
    try:
        while not done.wait(0.25):
            now = time.monotonic()
            if not backend_up:
                backend_up = _ray_started()
                if not backend_up and now - t0 > opts.backend_timeout:
                    stop.set()
                    _abandon(done, SHUTDOWN_GRACE)
                    if (error := _real_error(errors)) is not None:  # Ray failed by itself meanwhile, say
                        raise FederationFailed(explain(error, opts)) from error
                    raise FederationFailed(
                        f"the simulation backend (Ray) did not start within --backend-timeout "
                        f"{opts.backend_timeout:g}s; raise --backend-timeout (a busy machine starts Ray slowly), or "
                        f"check that Ray can start here: python -c 'import ray; ray.init()'")
            if server_done.is_set():
                server_ended = server_ended or now
                if now - server_ended > SHUTDOWN_GRACE:
                    _abandon(done, 0)
                    raise FederationFailed(
                        f"the simulation backend (Ray) did not shut down within {SHUTDOWN_GRACE:g}s of the ServerApp's "
                        f"end" + (f" ({explain(errors['server'], opts)})" if "server" in errors else ""))
    except KeyboardInterrupt:
        stop.set()
        _abandon(done, SHUTDOWN_GRACE)
        raise
    error = _real_error(errors) or errors.get("server") or errors.get("simulation")
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


# ---- the report ---------------------------------------------------------------------------------------------------

def compare(reports: dict[str, dict]) -> dict:
    """Headline figures per strategy: zero-shot and final accuracy, mean deviation, bytes per round."""
    out = {}
    for name, rep in reports.items():
        rounds = rep["rounds"]
        trained = [r for r in rounds if r["round"] > 0]
        devs = [r["deviation"] for r in trained if r.get("deviation") is not None]
        out[name] = {"zero_shot_accuracy": rounds[0].get("dev_accuracy"),
                     "final_accuracy": trained[-1].get("dev_accuracy") if trained else None,
                     "final_train_loss": trained[-1].get("train_loss") if trained else None,
                     "mean_deviation": sum(devs) / len(devs) if devs else None,
                     "max_deviation": max(devs) if devs else None,
                     "adapter_bytes": rep["adapter"]["bytes"],
                     "flower_bytes_per_round": sum(r["flower_bytes_down"] + r["flower_bytes_up"] for r in trained)
                     / max(1, len(trained)),
                     "split_bytes_per_round": sum(r["split_bytes_up"] + r["split_bytes_down"] for r in trained)
                     / max(1, len(trained)),
                     "seconds": rep.get("seconds")}
    return out


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def _f(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def round_table(rep: dict) -> str:
    rows = []
    for r in rep["rounds"]:
        rows.append([r["round"], _f(r.get("train_loss")), _f(r.get("dev_accuracy"), "{:.3f}"),
                     r.get("devices", "-"), _mb(r.get("flower_bytes_down")), _mb(r.get("flower_bytes_up")),
                     _mb(r.get("adapter_bytes_up")), _f(r.get("split_bytes_per_step", None) and
                                                        r["split_bytes_per_step"] / 1e6, "{:.3f}"),
                     _mb(None if "split_bytes_up" not in r else r["split_bytes_up"] + r["split_bytes_down"]),
                     _f(r.get("deviation"), "{:.2e}"), _f(r.get("seconds"), "{:.0f}")])
    return table(["round", "loss", "dev acc", "devices", "Flower down MB", "Flower up MB", "adapter up MB",
                  "split MB/step", "split MB", "deviation", "s"], rows)


def device_table(rep: dict) -> str:
    """Per device, summed over rounds: Flower traffic and split traffic (steps and bytes)."""
    per: dict[int, Counter] = {}
    modes: dict[int, set] = {}
    for r in rep["rounds"]:
        for c in r.get("clients", []):
            d = per.setdefault(c["partition"], Counter())
            d.update({k: c[k] for k in ("split_steps", "split_bytes_up", "split_bytes_down", "flower_bytes_down",
                                        "flower_bytes_up", "adapter_bytes_down", "adapter_bytes_up")})
            d["rounds"] += 1
            d["examples"] = c["examples"]
            d["local_steps"] += c.get("local_steps", c["split_steps"])
            modes.setdefault(c["partition"], set()).add(c.get("mode", "cloud"))
    rows = [[p, "+".join(sorted(modes[p])), d["examples"], d["rounds"], _mb(d["flower_bytes_down"]),
             _mb(d["flower_bytes_up"]), d["local_steps"], d["split_steps"], _mb(d["split_bytes_up"]),
             _mb(d["split_bytes_down"])] for p, d in sorted(per.items())]
    tot = Counter()
    for d in per.values():
        tot.update(d)
    rows.append(["total", "", sum(d["examples"] for d in per.values()), "", _mb(tot["flower_bytes_down"]),
                 _mb(tot["flower_bytes_up"]), tot["local_steps"], tot["split_steps"], _mb(tot["split_bytes_up"]),
                 _mb(tot["split_bytes_down"])])
    return table(["device", "trains", "examples", "rounds", "Flower down MB", "Flower up MB", "steps", "split steps",
                  "split up MB", "split down MB"], rows)


def comparison_table(comparison: dict) -> str:
    rows = [[name, _f(c["zero_shot_accuracy"], "{:.3f}"), _f(c["final_accuracy"], "{:.3f}"),
             _f(c["final_train_loss"]), _f(c["mean_deviation"], "{:.2e}"), c["adapter_bytes"],
             _mb(c["flower_bytes_per_round"]), _mb(c["split_bytes_per_round"]), _f(c["seconds"], "{:.0f}")]
            for name, c in comparison.items()]
    return table(["strategy", "zero-shot acc", "final acc", "final loss", "mean deviation", "adapter B",
                  "Flower MB/round", "split MB/round", "s"], rows)


def plot(reports: dict[str, dict], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rep in reports.items():
        rounds = rep["rounds"]
        acc = [(r["round"], r["dev_accuracy"]) for r in rounds if r.get("dev_accuracy") is not None]
        loss = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", label=name)
        if loss:
            ax_loss.plot(*zip(*loss), marker="o", label=name)
    ax_acc.set(xlabel="round", ylabel="dev accuracy (global adapter)", title="accuracy per round")
    ax_loss.set(xlabel="round", ylabel="mean train loss of the devices", title="train loss per round")
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(summary: dict, out: str | Path | None = None) -> str:
    """The terminal report; with `out`, also writes federation.png there."""
    parts = []
    if summary.get("partitions"):
        parts.append("partitions (label counts per device):\n" + table(
            ["device", "examples", "labels"],
            [[p["device"], p["examples"], " ".join(f"{k}:{v}" for k, v in p["labels"].items())]
             for p in summary["partitions"]]))
    for name, rep in summary["runs"].items():
        parts.append(f"[{name}] adapter {rep['adapter']['parameters']} parameters, {rep['adapter']['bytes']} bytes "
                     f"in {rep['adapter']['dtype']}\n" + round_table(rep))
        parts.append(f"[{name}] per device, all rounds\n" + device_table(rep))
    parts.append("comparison\n" + comparison_table(summary["comparison"]))
    if out is not None:
        parts.append(f"plot: {plot(summary['runs'], Path(out) / 'federation.png')}")
    return "\n\n".join(parts)


def load_summary(out: str | Path) -> dict:
    return json.loads((Path(out) / "federation.json").read_text())


__all__ = ["FederateOptions", "FederationConfig", "FederationFailed", "simulate", "partition", "write_partitions",
           "federate", "render", "compare", "load_summary", "PARTITIONERS"]
