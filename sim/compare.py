"""`tandem sim compare`: a what-if table over paths and links, the cloud's saturation point, and three plots.

    step time vs link bandwidth, one line per path          step_time_vs_bandwidth.png
    bytes per step vs cut position k (m fixed)              bytes_vs_cut.png
    cloud utilisation (and step time) vs number of edges N  utilisation_vs_edges.png

Every table is printed with the assumptions behind it (devices and their sources, links, workload).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sim.costmodel import StepCost, Workload, method_note, path_problem, paths_for, predict, predict_all
from sim.events import SaturationPoint, saturation, simulate
from sim.profiles import DeviceProfile, LinkProfile, rate_link
from sim.shape import ModelShape
from sim.wire import cloud_blocks

REMOTE = ("split", "dlora", "carried")
WHOLE_WEIGHTS = ("local-full", "offsite")  # paths that train whole weights: the PEFT method does not apply


def _mb(x: float) -> str:
    return f"{x / 1e6:,.2f}"


def _dur(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s"


def format_table(costs: list[tuple[LinkProfile, StepCost]]) -> str:
    """One row per (link, path): bytes, messages, time split by cause, epoch time, peak memory and whether it fits."""
    head = (f"{'path':<11}{'method':<8}{'link':>10}{'up MB':>11}{'down MB':>11}{'msgs':>6}{'edge s':>9}{'cloud s':>9}"
            f"{'network s':>11}{'step':>10}{'epoch':>10}{'edge GB':>9}{'cloud GB':>9}")
    lines = [head, "-" * len(head)]
    for link, c in costs:
        network = c.transfer_s + c.codec_s + c.latency_s
        fit = lambda ok: "" if ok else "!"  # noqa: E731
        method = "-" if c.path in WHOLE_WEIGHTS else c.workload.method
        lines.append(f"{c.path:<11}{method:<8}{link.name:>10}{_mb(c.bytes_up):>11}{_mb(c.bytes_down):>11}"
                     f"{c.messages:>6.3g}"
                     f"{c.edge.seconds:>9.3g}{c.cloud.seconds:>9.3g}{network:>11.3g}{_dur(c.step_s):>10}"
                     f"{_dur(c.epoch_s):>10}{c.edge.peak_bytes / 1e9:>8.1f}{fit(c.edge_fits):1}"
                     f"{c.cloud.peak_bytes / 1e9:>8.1f}{fit(c.cloud_fits):1}")
    lines.append("! = does not fit the device's memory.  network = transfer + codec + latency.  Federated: per step"
                 " of a round (round / local steps).  Offsite: plus a one-time emulator download.  method - : whole"
                 " weights trained, whatever --peft.")
    return "\n".join(lines)


def assumptions(shape: ModelShape, w: Workload, edge: DeviceProfile, cloud: DeviceProfile,
                links: list[LinkProfile]) -> str:
    cb = len(cloud_blocks(shape, w.k, w.m))
    lines = [
        f"model      {shape.name}: {shape.total_params / 1e9:.2f} B parameters, {shape.layers} blocks, hidden "
        f"{shape.hidden}, {shape.heads} heads ({shape.kv_heads} KV), vocab {shape.vocab} (config.json only)",
        f"workload   batch {w.batch} x {w.seq} tokens, task {w.task}; cut k={w.k}, m={w.m} ({cb} cloud blocks); "
        f"{method_note(w)}; wire up {w.wire_up}, down {w.wire_down}; DLoRA active "
        f"fraction {w.active_fraction:g}; emulator keeps {w.emulator_fraction:g} of the middle; federated round "
        f"= {w.local_steps} steps; epoch = {w.epoch_examples} examples ({w.steps_per_epoch} steps)",
        f"edge       {edge.name}: {edge.throughput(w.tokens) / 1e12:.3g} TFLOP/s sustained, {edge.memory / 1e9:.0f} GB, "
        f"{8 * edge.dtype_bytes}-bit training, codec {edge.codec / 1e9:.2g} GB/s. {edge.source}",
        f"cloud      {cloud.name}: {cloud.throughput(w.tokens) / 1e12:.3g} TFLOP/s sustained, {cloud.memory / 1e9:.0f} GB, "
        f"{cloud.memory_bandwidth / 1e12:.3g} TB/s, {cloud.kernel_overhead * 1e3:g} ms per job. {cloud.source}",
    ]
    for link in links:
        lines.append(f"link       {link.name}: {link.up_bps / 1e6:g}/{link.down_bps / 1e6:g} Mbit/s up/down, "
                     f"rtt {link.rtt * 1e3:.3g} ms, TCP payload share {link.efficiency:.3f} (MTU {link.mtu}). "
                     f"{link.source}")
    lines.append("time       = edge FLOPs/throughput + cloud max(FLOPs/throughput, weights/bandwidth) + per message "
                 "(bytes/payload rate + codec + rtt/2); all sequential. Bytes are exact protobuf + gRPC sizes.")
    return "\n".join(lines)


@dataclass(frozen=True)
class Saturation:
    path: str
    link: str
    point: SaturationPoint


def saturation_points(shape, w, edge, cloud, links, paths=REMOTE) -> list[Saturation]:
    """Where one cloud device stops keeping up, per remote path and link."""
    return [Saturation(path, link.name, saturation(predict(shape, path, w, edge, cloud, link), cloud))
            for link in links for path in paths]


def format_saturation(points: list[Saturation], cloud: DeviceProfile) -> str:
    lines = [f"{'path':<8}{'link':>10}{'N saturating':>14}{'limit':>10}{'util':>7}{'steps in flight':>17}"
             f"{'step at N':>11}{'slowdown':>10}{'compute-bound N':>17}"]
    for p in points:
        r = p.point.result
        lines.append(f"{p.path:<8}{p.link:>10}{p.point.n:>14}{p.point.limit:>10}{r.cloud_utilisation:>7.2f}"
                     f"{f'{r.max_in_flight}/{r.memory_slots}':>17}{_dur(r.step_s):>11}{r.slowdown:>10.2f}"
                     f"{p.point.compute_bound_n:>17.0f}")
    lines.append(f"One {cloud.name}, event simulation. Saturated = cloud busy >= 95 % of the time, or steps 10 % slower"
                 " than alone (queueing for compute, or for memory: a step keeps its cloud activations from forward "
                 "to backward). compute-bound N = step time alone / cloud time per step.")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _finish(plt, fig, ax, out: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label a one-axes plot, grid and legend, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(plt, fig, out)


def plot_step_time_vs_bandwidth(shape, w, edge, cloud, rtt: float, out: Path, paths=None) -> Path:
    import numpy as np
    plt = _plt()
    paths = paths_for(w) if paths is None else paths
    rates = np.logspace(6, 10, 41)  # 1 Mbit/s .. 10 Gbit/s
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in paths:
        costs = [predict(shape, path, w, edge, cloud, rate_link(r, rtt)) for r in rates]
        fits = costs[0].edge_fits and costs[0].cloud_fits
        ax.loglog(rates / 1e6, [c.step_s for c in costs], "-" if fits else ":",
                  label=path if fits else f"{path} (does not fit in memory)")
    return _finish(plt, fig, ax, out, "link bandwidth (Mbit/s, both directions)", "time per step (s)",
                   f"{shape.name}: step time vs bandwidth (edge {edge.name}, cloud {cloud.name})")


def plot_bytes_vs_cut(shape, w, edge, cloud, link, out: Path) -> Path:
    plt = _plt()
    ks = list(range(1, shape.layers - w.m))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    remote = ("split", "dlora") if path_problem("dlora", w) is None else ("split", "carried")
    remote = [p for p in remote if path_problem(p, w) is None]  # the method's: dlora, else carried
    for path, dtype in ((p, d) for p in remote for d in (w.wire_up, "int8")):
        ys = [predict(shape, path, replace(w, k=k, wire_up=dtype, wire_down=dtype), edge, cloud, link).bytes_total
              for k in ks]
        ax.semilogy(ks, [y / 1e6 for y in ys], label=f"{path} ({dtype})")
    return _finish(plt, fig, ax, out, f"cut position k (edge-bottom blocks; m = {w.m})",
                   "bytes per step, both directions (MB)",
                   f"{shape.name}: bytes per step vs cut (batch {w.batch} x {w.seq})")


def plot_utilisation_vs_edges(shape, w, edge, cloud, link, out: Path, ns=(1, 2, 4, 8, 16, 32, 64, 128),
                              paths=REMOTE) -> Path:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for path in paths:
        cost = predict(shape, path, w, edge, cloud, link)
        rs = [simulate(cost, n, cloud) for n in ns]
        ax.semilogx(ns, [r.cloud_utilisation for r in rs], marker="o", label=path)
        ax2.loglog(ns, [r.step_s for r in rs], marker="o", label=path)
    ax.set_xlabel("edges sharing the cloud (N)")
    ax.set_ylabel("cloud utilisation")
    ax.set_ylim(0, 1.05)
    ax2.set_xlabel("edges sharing the cloud (N)")
    ax2.set_ylabel("time per step (s)")
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    fig.suptitle(f"{shape.name} on one {cloud.name}, {link.name} links (event simulation)")
    return _save(plt, fig, out)


def compare(shape: ModelShape, w: Workload, edge: DeviceProfile, cloud: DeviceProfile, links: list[LinkProfile],
            paths=None, out_dir: str | Path | None = None, ns=(1, 2, 4, 8, 16, 32, 64, 128)) -> dict:
    """Print the what-if and saturation tables with their assumptions; write the plots to `out_dir`. `paths`
    None: every path the workload's method has."""
    paths = paths_for(w) if paths is None else paths
    rows = [(link, c) for link in links for c in predict_all(shape, w, edge, cloud, link, paths)]
    print(assumptions(shape, w, edge, cloud, links))
    print()
    print(format_table(rows))
    remote = [p for p in paths if p in REMOTE]
    points = saturation_points(shape, w, edge, cloud, links, remote) if remote else []
    if points:
        print()
        print(format_saturation(points, cloud))
    plots = []
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plots.append(plot_step_time_vs_bandwidth(shape, w, edge, cloud, links[0].rtt, out / "step_time_vs_bandwidth.png",
                                                 paths))
        plots.append(plot_bytes_vs_cut(shape, w, edge, cloud, links[0], out / "bytes_vs_cut.png"))
        if remote:
            plots.append(plot_utilisation_vs_edges(shape, w, edge, cloud, links[-1], out / "utilisation_vs_edges.png",
                                                   ns, remote))
        print("\nplots: " + ", ".join(str(p) for p in plots))
    return {"rows": [{"path": c.path, "link": link.name, "bytes_up": c.bytes_up, "bytes_down": c.bytes_down,
                      "step_s": c.step_s, "epoch_s": c.epoch_s, "edge_fits": c.edge_fits} for link, c in rows],
            "saturation": [{"path": p.path, "link": p.link, "n": p.point.n, "limit": p.point.limit,
                            "utilisation": p.point.result.cloud_utilisation,
                            "compute_bound_n": p.point.compute_bound_n} for p in points],
            "plots": [str(p) for p in plots]}
