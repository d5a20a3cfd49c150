"""FFA-LoRA (Sun et al., 2024): A stays frozen at its shared random init, clients train B only, the server averages B.

Every client holds the same A, so the average of the updates is exact:

    sum_i p_i B_i A  =  (sum_i p_i B_i) A

A is not averaged but taken from the adapter the round started from: the clients never changed it, and under
SecAgg+ an average would only add quantization noise to it. LoRA only (`methods`): the other PEFT methods have no A
to freeze. With DoRA the magnitudes are trained and averaged too; B's update is then exact, but the adapted weight
m (W + s B A) / ||W + s B A|| is not linear in B and m, so the merge is not the mean of the clients' adapted weights
(its deviation says by how much).
"""
from __future__ import annotations

import numpy as np

from cloud.federation.strategies.base import LoRAFedAvg, lora_pairs, weighted_mean


class FFALoRA(LoRAFedAvg):
    """Clients train B with A frozen (`freeze-a` in the train config); the server averages B (and DoRA's magnitudes),
    keeps A."""

    freeze_a = True
    name = "ffa"
    methods = ("lora",)

    def merge(self, adapters: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        frozen = [a for a, _ in lora_pairs(adapters[0])]
        merged = weighted_mean(adapters, weights, keys=[k for k in adapters[0] if k not in frozen])
        for a_key in frozen:
            merged[a_key] = self.start[a_key] if self.start else adapters[0][a_key]
        return {k: merged[k] for k in adapters[0]}  # the order the clients use
