"""FedIT: FedAvg of LoRA's A and B, each averaged on its own (the FlowerTune baseline).

    A' = sum_i p_i A_i        B' = sum_i p_i B_i        so  B'A' = (sum_i p_i B_i)(sum_i p_i A_i)

which is not the average of the clients' updates sum_i p_i B_i A_i: the cross terms p_i p_j B_i A_j (i != j) come in.
It is the reference the exact methods are measured against; its deviation is reported every round.
"""
from __future__ import annotations

import numpy as np

from cloud.federation.strategies.base import LoRAFedAvg, weighted_mean


class FedAvgLoRA(LoRAFedAvg):
    """Clients train A and B; the server averages each."""

    freeze_a = False
    name = "fedavg"

    def merge(self, adapters: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        return weighted_mean(adapters, weights)
