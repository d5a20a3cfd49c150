"""The report of a federation simulation (`tandem federate`): headline figures per strategy, the terminal tables
(per round, per device, the comparison) and the accuracy / loss plot, from the ServerApps' report.json files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


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
