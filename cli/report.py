"""Terminal tables and plots of edge training runs."""
from __future__ import annotations

from pathlib import Path


def _fmt_eval(ev: dict | None) -> str:
    if not ev:
        return "-"
    if "accuracy" in ev:
        return f"{100 * ev['accuracy']:.1f}%"
    return f"ppl {ev['perplexity']:.1f}"


def client_rows(runs: list[tuple[str, dict]]) -> list[list[str]]:
    rows = []
    for name, m in runs:
        s = m.get("summary", {})
        rows.append([name, str(s.get("steps", 0)), f"{s.get('first_loss', float('nan')):.3f} -> "
                     f"{s.get('mean_loss_last10', float('nan')):.3f}",
                     f"{_fmt_eval(m.get('eval_before'))} -> {_fmt_eval(m.get('eval_after'))}",
                     f"{s.get('bytes_up_per_step', 0) / 1e6:.2f}", f"{s.get('bytes_down_per_step', 0) / 1e6:.2f}",
                     f"{s.get('wire_over_payload') or 0:.5f}",
                     f"{s.get('edge_seconds_per_step', 0):.2f} / {s.get('cloud_seconds_per_step', 0):.2f}",
                     f"{s.get('step_seconds', 0):.2f}"])
    return rows


HEADER = ["client", "steps", "loss first -> last10", "dev before -> after", "MB up/step", "MB down/step",
          "wire/payload", "edge/cloud s", "step s"]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def print_client_table(runs: list[tuple[str, dict]]) -> None:
    print(table(HEADER, client_rows(runs)), flush=True)


def plot_losses(runs: list[tuple[str, dict]], path: str | Path, title: str = "training loss") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in runs:
        losses = [r["loss"] for r in m["steps"]]
        k = 5
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(losses, alpha=0.25)
        ax.plot(smooth, label=f"{name} (mean of {k})", color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
