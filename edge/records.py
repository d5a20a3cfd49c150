"""What an edge run records of each step and of the whole run: StepRecord, its traffic, the summary, TensorBoard.

    records = [asdict(StepRecord(...)), ...]   # one per step: loss, wire bytes and messages, edge/cloud seconds
    metrics["summary"] = summarize(records)    # means per step, first/last loss, wire over payload
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepRecord:
    step: int
    loss: float
    bytes_up: int
    bytes_down: int
    payload_up: int
    payload_down: int
    messages_up: int
    messages_down: int
    edge_seconds: float
    cloud_seconds: float
    step_seconds: float
    active_blocks: list[int] = field(default_factory=list)


def sum_traffic(parts: list):
    """One step's traffic from its micro-batches' (gradient accumulation: each is its own cloud step)."""
    if len(parts) == 1:
        return parts[0]
    from protocol.step import Traffic
    keys = ("bytes_up", "bytes_down", "payload_up", "payload_down", "messages_up", "messages_down", "cloud_seconds",
            "wait_seconds")
    return Traffic(**{k: sum(getattr(t, k) for t in parts) for k in keys})


def step_record(step: int, loss: float, seconds: float, traffic: list, active_blocks: list[int]) -> StepRecord:
    """A step's record from its loss, wall time and its micro-batches' traffic (the cloud's waits are not the edge's
    time)."""
    tr = sum_traffic(traffic)
    return StepRecord(step, loss, tr.bytes_up, tr.bytes_down, tr.payload_up, tr.payload_down, tr.messages_up,
                      tr.messages_down, seconds - tr.wait_seconds, tr.cloud_seconds, seconds, active_blocks)


def traffic_postfix(rec: dict) -> dict:
    """The progress bar's figures from a step's record."""
    return {"up_kB": f"{rec['bytes_up'] / 1e3:.0f}", "down_kB": f"{rec['bytes_down'] / 1e3:.0f}"}


def summarize(records: list[dict]) -> dict:
    if not records:
        return {}
    n = len(records)
    mean = lambda k: sum(r[k] for r in records) / n  # noqa: E731
    up, down = mean("bytes_up"), mean("bytes_down")
    pay = mean("payload_up") + mean("payload_down")
    return {"steps": n, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "mean_loss_last10": sum(r["loss"] for r in records[-10:]) / min(10, n),
            "bytes_up_per_step": up, "bytes_down_per_step": down,
            "wire_over_payload": (up + down) / pay if pay else None,
            "edge_seconds_per_step": mean("edge_seconds"), "cloud_seconds_per_step": mean("cloud_seconds"),
            "step_seconds": mean("step_seconds")}


def run_summary(records: list[dict], cloud_lora_blocks: list[int]) -> dict:
    """`summarize`, and under DLoRA the mean fraction of the cloud's LoRA blocks active in a step (Kill & Revive)."""
    summary = summarize(records)
    if cloud_lora_blocks:
        summary["active_fraction"] = (sum(len(r["active_blocks"]) for r in records)
                                      / max(1, len(records) * len(cloud_lora_blocks)))
    return summary


def open_board(folder: str | None):
    """A TensorBoard writer for --tensorboard (torch.utils.tensorboard), or None."""
    if not folder:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(folder)


def board_eval(board, scores: dict | None, step: int) -> None:
    """A dev evaluation's accuracy or perplexity on the board, if there is one."""
    if board is not None and scores:
        for key in ("accuracy", "perplexity"):
            if key in scores:
                board.add_scalar(f"dev/{key}", scores[key], step)


def board_step(board, step: int, loss: float, lr: float, rec: StepRecord) -> None:
    """A training step's loss, learning rate and wire bytes on the board, if there is one."""
    if board is not None:
        for key, value in (("train/loss", loss), ("train/lr", lr), ("wire/bytes_up", rec.bytes_up),
                           ("wire/bytes_down", rec.bytes_down)):
            board.add_scalar(key, value, step)
