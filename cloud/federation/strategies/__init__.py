"""Aggregation strategies of the federation's adapter, each a Flower `FedAvg` with its own `merge` (one per file):
fedavg merges every PEFT method, ffa (FFA-LoRA) LoRA only (a strategy's `methods`)."""
from cloud.federation.strategies.base import LoRAFedAvg
from cloud.federation.strategies.fedavg_lora import FedAvgLoRA
from cloud.federation.strategies.ffa_lora import FFALoRA

STRATEGIES: dict[str, type[LoRAFedAvg]] = {"fedavg": FedAvgLoRA, "ffa": FFALoRA}

__all__ = ["LoRAFedAvg", "FedAvgLoRA", "FFALoRA", "STRATEGIES"]
