"""FedAvg of every trained parameter, each weighted by the client's examples: for LoRA this is FedIT (the FlowerTune
baseline), A and B each averaged on its own.

    A' = sum_i p_i A_i        B' = sum_i p_i B_i        so  B'A' = (sum_i p_i B_i)(sum_i p_i A_i)

which is not the average of the clients' updates sum_i p_i B_i A_i: the cross terms p_i p_j B_i A_j (i != j) come in.
It is the reference the exact methods are measured against; its deviation is reported every round. The same mean
serves every other PEFT method (model/tuners METHODS `fedavg` says what it means for each): DoRA's magnitudes, (IA)³'s
vectors (exact: a site's adapted weight is linear in its vector), prompt tuning's virtual tokens (exact: they are the
parameters), P-tuning's encoder weights (its output, the virtual tokens, is not the mean of the clients' outputs).
"""
from __future__ import annotations

import numpy as np

from cloud.federation.strategies.base import LoRAFedAvg, weighted_mean


class FedAvgLoRA(LoRAFedAvg):
    """Clients train every weight of the method; the server averages each."""

    freeze_a = False
    name = "fedavg"
    methods = None  # a weighted mean applies to every method's parameters

    def merge(self, adapters: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        return weighted_mean(adapters, weights)
