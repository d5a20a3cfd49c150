"""What a cost prediction reports (sim.costmodel computes them): a step as sequential phases, each side's FLOPs, time
and peak memory, and the whole step's bytes, round trips and time."""
from __future__ import annotations

from dataclasses import dataclass

from protocol.step import Traffic
from sim.compute import Workload


@dataclass(frozen=True)
class Phase:
    """One sequential piece of a step. Cloud phases carry their work so a shared cloud can re-time them."""
    where: str  # "edge", "cloud", "up", "down"
    seconds: float  # duration when this edge is alone
    what: str = ""
    flops: float = 0.0  # cloud: FLOPs of this job
    weight_bytes: float = 0.0  # cloud: weights this job reads
    key: str = ""  # cloud: jobs with the same key use the same weights and may run as one batch
    wire_bytes: int = 0
    tokens: int = 0  # cloud: tokens this job processes (a batch of jobs runs at the throughput of their sum)
    alone: bool = False  # cloud: never batched with other edges' jobs (the cloud runs carried DoRA, (IA)³ alone)


@dataclass(frozen=True)
class SideCost:
    """FLOPs, time and peak memory of one side for one step."""
    flops: float = 0.0
    seconds: float = 0.0
    weight_bytes: float = 0.0
    state_bytes: float = 0.0  # gradients + optimizer moments
    activation_bytes: float = 0.0
    trained_params: int = 0

    @property
    def peak_bytes(self) -> float:
        return self.weight_bytes + self.state_bytes + self.activation_bytes


@dataclass(frozen=True)
class StepCost:
    """Everything predicted for one training step of one path (per step; a federated round is amortized)."""
    path: str
    model: str
    workload: Workload
    edge: SideCost
    cloud: SideCost
    bytes_up: float
    bytes_down: float
    payload_up: float
    payload_down: float
    messages: int
    round_trips: float
    transfer_s: float
    codec_s: float
    latency_s: float
    phases: tuple[Phase, ...] = ()
    one_time_bytes: float = 0.0  # offsite: the emulator download; bytes that are not per step
    traffic: Traffic | None = None
    notes: tuple[str, ...] = ()
    edge_fits: bool = True
    cloud_fits: bool = True

    @property
    def step_s(self) -> float:
        return self.edge.seconds + self.cloud.seconds + self.transfer_s + self.codec_s + self.latency_s

    @property
    def epoch_s(self) -> float:
        return self.step_s * self.workload.steps_per_epoch

    @property
    def bytes_total(self) -> float:
        return self.bytes_up + self.bytes_down


__all__ = ["Phase", "SideCost", "StepCost"]
