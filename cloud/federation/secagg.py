"""SecAgg+ for the adapter upload, on the Message API: the server learns the weighted average, never one adapter.

Flower 1.42 ships SecAgg+ as `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client); the workflow is written
for the legacy strategy API (it asks a legacy `Strategy` for FitIns and hands the unmasked sum to `aggregate_fit`).
`secure_train_round` runs that same workflow, stage for stage, for one round of a Message API strategy:

  - the round's train messages (from `strategy.configure_train`) are what the clients receive in the stage that
    trains ("collect masked vectors"), so the ClientApp sees an ordinary train message;
  - the legacy strategy the workflow consults is `_OneRound`, which offers exactly those nodes and, at the end, takes
    the unmasked weighted average the workflow computed;
  - the result comes back as one reply carrying that average, weighted by the clients' total examples, which the
    strategy's `aggregate_train` then treats like a single client (FedAvg of one is itself; FFA-LoRA takes B from it).

The client side is `edge/federation/mods.py` (`secaggplus_when_asked`). Quantization: each client clips its
weighted adapter to +-clipping_range and rounds it stochastically to `quantization_range` levels, so the average
is exact up to about clipping_range * 2 / quantization_range / (sum of weights / max_weight) per element.
Per-client metrics (loss, traffic) are not masked: only the arrays are. Legacy metrics are scalars, so the client
sends list metrics as JSON text and they are decoded here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from cloud.federation.strategies.base import SUMMED


@dataclass
class SecAggConfig:
    num_shares: float = 1.0  # fraction of the round's clients each one shares its keys with
    reconstruction_threshold: float = 0.5  # fraction of the shares needed to unmask a dropped client
    clipping_range: float = 8.0  # |weight x parameter| is clipped to this before quantization
    quantization_range: int = 1 << 22
    max_weight: float = 100_000.0  # the largest client weight (its number of examples) expected
    timeout: float | None = None


@dataclass
class _Node:
    """What the legacy workflow needs of a client proxy: its node id (and a hashable identity)."""
    node_id: int

    def __hash__(self):
        return hash(self.node_id)


class _OneRound:
    """The legacy-strategy face the workflow talks to: offers this round's nodes, keeps the securely summed result."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids
        self.results: list = []
        self.average: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(nid), FitIns(parameters, {})) for nid in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        if results:  # the workflow put the unmasked average into every result's parameters
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        return (results[0][1].parameters if results else None), {}


class _MessageApiSecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, except that the stage that trains sends our Message API train messages."""

    def __init__(self, contents: dict[int, RecordDict], cfg: SecAggConfig):
        super().__init__(cfg.num_shares, cfg.reconstruction_threshold, max_weight=cfg.max_weight,
                         clipping_range=cfg.clipping_range, quantization_range=cfg.quantization_range,
                         timeout=cfg.timeout)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok


def secure_train_round(grid: Grid, context: Context, server_round: int, messages: list[Message],
                       cfg: SecAggConfig, weight_key: str = "num-examples"
                       ) -> tuple[list[Message], list[tuple[int, dict]]]:
    """Run SecAgg+ over this round's train messages. Returns ([one reply with the weighted average adapter and the
    total weight], [(node id, that client's metrics)]). Raises if the protocol could not finish."""
    if len(messages) < 2:
        raise ValueError("SecAgg+ needs at least two clients per round")
    keys = list(messages[0].content.array_records[next(iter(messages[0].content.array_records))].keys())
    contents = {}
    for msg in messages:  # one RecordDict per node: the workflow adds that node's key shares to it
        contents[msg.metadata.dst_node_id] = RecordDict(dict(msg.content.items()))
    plan = _OneRound(list(contents))
    legacy = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                                   state=RecordDict(), run_config=context.run_config),
                           strategy=plan, client_manager=SimpleClientManager())
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    _MessageApiSecAggPlus(contents, cfg)(grid, legacy)
    if plan.average is None or len(plan.average) != len(keys):
        raise RuntimeError(f"SecAgg+ round {server_round} did not complete: "
                           f"{len(plan.results)} of {len(messages)} clients' masked adapters were unmasked")
    per_client = [(proxy.node_id, {k: json.loads(v) if isinstance(v, str) and v.startswith("[") else v
                                   for k, v in fit_res.metrics.items()}) for proxy, fit_res in plan.results]
    total = sum(float(fit_res.num_examples) for _, fit_res in plan.results)
    summary = {weight_key: int(total)}  # what the strategy's metric aggregation would make of the clients' metrics
    for key, value in per_client[0][1].items():
        if key in (weight_key, "partition-id") or not isinstance(value, (int, float)):
            continue
        if key in SUMMED:
            summary[key] = sum(m[key] for _, m in per_client)
        else:
            summary[key] = float(sum(m[key] * m[weight_key] for _, m in per_client) / total)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, plan.average)}),
                          "metrics": MetricRecord(summary)})
    reply = Message(content, dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    return [reply], per_client

