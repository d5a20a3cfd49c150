"""FFA-LoRA (Sun et al., 2024): A stays frozen at its shared random init, clients train B only, the server averages B.

Every client holds the same A, so the average of the updates is exact:

    sum_i p_i B_i A  =  (sum_i p_i B_i) A

A is not averaged but taken from the adapter the round started from: the clients never changed it, and under
SecAgg+ an average would only add quantization noise to it.
"""
from __future__ import annotations

import numpy as np

from cloud.federation.strategies.base import LoRAFedAvg, lora_pairs, weighted_mean


class FFALoRA(LoRAFedAvg):
    """Clients train B with A frozen (`freeze-a` in the train config); the server averages B, keeps A."""

    freeze_a = True
    name = "ffa"

    def merge(self, adapters: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        pairs = lora_pairs(adapters[0])
        merged = weighted_mean(adapters, weights, keys=[b for _, b in pairs])
        for a_key, _ in pairs:
            merged[a_key] = self.start[a_key] if self.start else adapters[0][a_key]
        return {k: merged[k] for k in adapters[0]}  # the order the clients use
