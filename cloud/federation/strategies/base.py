"""What every Tandem strategy shares: Flower's `FedAvg`, taught that its arrays are one adapter of a PEFT method.

The global adapter travels as an `ArrayRecord`: the method's weights in the federation's exchange form
(protocol/federation.py): PEFT's state-dict names for LoRA (`base_model.model.model.layers.0.self_attn.q_proj
.lora_A.weight`, ..., DoRA's `lora_magnitude_vector`), (IA)³ (`...ia3_l`) and prompt tuning (`prompt_embeddings`),
the prompt encoder's own weights for P-tuning (`encoder.mlp_head.0.weight`, ...), in the adapter's wire dtype.
The server keeps its own copy in float32 and does all arithmetic in float64.

`LoRAFedAvg` adds to `FedAvg`:
  - `configure_train` remembers the adapter it sends: every client's update starts from it (needed by FFA-LoRA, which
    keeps A, and by the deviation measurement); it also tells the clients whether to freeze A.
  - `configure_evaluate` sends the global adapter to `eval_nodes` nodes, each with a disjoint slice of the dev set,
    and `aggregate_evaluate` weights by examples, so the result is the exact accuracy on the whole dev set.
  - `train_metrics`: examples-weighted loss, summed traffic.
Each strategy (one per file) overrides `merge`: the clients' adapters and weights in, the merged adapter out; its
`methods` says which PEFT methods it can merge (None: any, since a weighted mean applies to every parameter).

The deviation reported per round is how far the merge is from the true average of what the clients' weights do, over
every site:   || E(merged) - sum_i p_i E(client_i) ||_F  /  || sum_i p_i E(client_i) - E(start) ||_F
with p_i the clients' weights, `start` the adapter the round started from, and E the method's effective weights
(the server gives it, server_app.py `effective_weights`): by default LoRA's products B A (`lora_products`), for DoRA
the adapted weight's change, for (IA)³ and prompt tuning the trained parameters themselves (their deviation is then
float rounding: FedAvg of them is exact), for P-tuning the encoder's output, the virtual tokens, for prefix tuning the
prefixes (the encoder's output; without a projection its table, exact like prompt tuning's). Zero means the merge
averaged what the clients' adapters do exactly.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, sample_nodes
from flwr.supercore import log

WEIGHT_KEY = "num-examples"
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
SUMMED = ("split-steps", "local-steps", "split-bytes-up", "split-bytes-down", "cloud-bytes-received",
          "cloud-bytes-sent", "on-emulator", WEIGHT_KEY)  # traffic and counts add up over clients; everything else is an examples-weighted mean


# ---- adapters as plain dicts of arrays ----------------------------------------------------------------------------

def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def arrays_to_record(arrays: dict[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    """An ArrayRecord in the given wire dtype, keys in the given order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=WIRE_DTYPES[dtype])) for k, v in arrays.items()})


def payload_bytes(record: ArrayRecord) -> int:
    """Raw tensor bytes of an ArrayRecord: elements x item size, what the adapter costs in its dtype."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())


MAGNITUDE = ".lora_magnitude_vector"  # DoRA's magnitude of a site, next to its A and B


def lora_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) of every LoRA site, in key order (DoRA's magnitudes may come with them)."""
    keys = list(keys)
    pairs = [(k, k.replace(".lora_A.", ".lora_B.")) for k in keys if ".lora_A." in k]
    missing = [b for _, b in pairs if b not in keys]
    magnitudes = [k for k in keys if k.endswith(MAGNITUDE)]
    if missing or 2 * len(pairs) + len(magnitudes) != len(keys):
        raise ValueError(f"not a LoRA adapter in PEFT naming: unpaired keys {missing or keys[:3]}")
    return pairs


def weighted_mean(adapters: list[dict[str, np.ndarray]], weights: list[float],
                  keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """sum_i p_i x_i per key (p = weights normalised), in float64: Flower's `aggregate_arrayrecords`, which
    accumulates in the arrays' dtype, on float64 copies of the adapters."""
    keys = list(adapters[0]) if keys is None else list(keys)
    records = [RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(a[k], dtype=np.float64)) for k in keys}),
                           "weight": MetricRecord({WEIGHT_KEY: float(w)})}) for a, w in zip(adapters, weights)]
    return record_to_arrays(aggregate_arrayrecords(records, WEIGHT_KEY))


Effective = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def lora_products(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B A of every LoRA site, in float64: what a LoRA adapter adds to each weight (up to its constant scaling)."""
    return {b_key: adapter[b_key].astype(np.float64) @ adapter[a_key].astype(np.float64)
            for a_key, b_key in lora_pairs(adapter)}


def as_float64(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameters themselves: the effective weights of a method linear in them ((IA)³, prompt tuning)."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in adapter.items()}


def aggregation_deviation(merged: dict[str, np.ndarray], adapters: list[dict[str, np.ndarray]],
                          weights: list[float], start: dict[str, np.ndarray],
                          effective: Effective = lora_products) -> float:
    """Relative Frobenius distance between the merged adapter's effective weights and the clients' average of theirs
    (module docstring); by default LoRA's B A."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    merged_e, start_e, clients_e = effective(merged), effective(start), [effective(ad) for ad in adapters]
    err = ref = 0.0
    for key, value in merged_e.items():
        true_avg = sum(pi * ce[key] for pi, ce in zip(p, clients_e))
        err += float(np.sum((value - true_avg) ** 2))
        ref += float(np.sum((true_avg - start_e[key]) ** 2))
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


def train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Examples-weighted mean of scalar metrics, except traffic and counts, which are summed. Lists are per client
    (per-step traffic) and stay out of the aggregate."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = float(sum(row[weighted_by_key] for row in rows))
    out = MetricRecord()
    for key, value in rows[0].items():
        if isinstance(value, list):
            continue
        if key in SUMMED:
            out[key] = sum(row[key] for row in rows)
        elif key != "partition-id":
            out[key] = float(sum(row[key] * row[weighted_by_key] for row in rows) / total)
    return out


class LoRAFedAvg(FedAvg):
    """FedAvg for one PEFT adapter (see the module docstring). Subclasses set `freeze_a` and `methods` and override
    `merge`. `effective` gives the effective weights the deviation compares (default: LoRA's B A)."""

    freeze_a = False
    name = "lora"
    methods: tuple[str, ...] | None = None  # the PEFT methods (model/tuners METHODS) it merges; None: every one

    def __init__(self, *, eval_nodes: int = 1, adapter_dtype: str = "float32", effective: Effective | None = None,
                 **fedavg_kwargs) -> None:
        fedavg_kwargs.setdefault("weighted_by_key", WEIGHT_KEY)
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", train_metrics)
        super().__init__(**fedavg_kwargs)
        if adapter_dtype not in WIRE_DTYPES:
            raise ValueError(f"adapter dtype must be one of {sorted(WIRE_DTYPES)}, got {adapter_dtype!r}")
        self.eval_nodes = eval_nodes
        self.adapter_dtype = adapter_dtype
        self.effective = effective or lora_products
        self.start: dict[str, np.ndarray] = {}  # the adapter this round's clients started from

    # ---- what goes out ---------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        wire = arrays_to_record(record_to_arrays(arrays), self.adapter_dtype)
        self.start = record_to_arrays(wire)  # exactly what the clients receive
        config["freeze-a"] = self.freeze_a
        return super().configure_train(server_round, wire, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.eval_nodes <= 0:
            return []
        available = len(list(grid.get_node_ids()))
        node_ids, _ = sample_nodes(grid, 1, min(self.eval_nodes, available))
        wire = arrays_to_record(record_to_arrays(arrays), self.adapter_dtype)
        messages = []
        for shard, node_id in enumerate(sorted(node_ids)):
            cfg = ConfigRecord(dict(config))
            cfg.update({"server-round": server_round, "dev-shard": shard, "dev-shards": len(node_ids)})
            messages.append(Message(RecordDict({self.arrayrecord_key: wire, self.configrecord_key: cfg}),
                                    dst_node_id=node_id, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:  # the mean drops the weight key; the number of dev examples is worth keeping
            metrics[self.weighted_by_key] = sum(int(next(iter(m.content.metric_records.values()))[
                self.weighted_by_key]) for m in replies if not m.has_error())
        return metrics

    # ---- what comes back -------------------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        adapters, weights = self.client_adapters(valid)
        return self.finish(server_round, valid, self.merge(adapters, weights), adapters, weights)

    @abstractmethod
    def merge(self, adapters: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        """The method: the clients' adapters and weights -> the merged adapter (keys in the clients' order).
        Each strategy (fedavg_lora.py, ffa_lora.py) is one override of this; the base class is never instantiated."""

    def client_adapters(self, replies: list[Message]) -> tuple[list[dict[str, np.ndarray]], list[float]]:
        """Each client's adapter and weight (its number of training examples)."""
        adapters, weights = [], []
        for msg in replies:
            adapters.append(record_to_arrays(msg.content[self.arrayrecord_key]))
            weights.append(float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key]))
        return adapters, weights

    def finish(self, server_round: int, replies: list[Message], merged: dict[str, np.ndarray],
               adapters: list[dict[str, np.ndarray]], weights: list[float]) -> tuple[ArrayRecord, MetricRecord]:
        """Package the merged adapter (float32, the server's copy) and the round's metrics, with the deviation of the
        merge from the true average update (only when the server saw more than one client's adapter: under SecAgg+
        it sees just their sum)."""
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        if len(adapters) > 1 and self.start:
            metrics["agg-deviation"] = aggregation_deviation(merged, adapters, weights, self.start, self.effective)
            log(INFO, "%s round %d: deviation of the merged adapter's effective weights from their mean: %.3e",
                self.name, server_round, metrics["agg-deviation"])
        return arrays_to_record(merged, "float32"), metrics
