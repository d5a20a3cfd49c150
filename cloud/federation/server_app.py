"""The Tandem ServerApp: rounds of federated PEFT training (LoRA, DoRA, rsLoRA, (IA)³, bottleneck adapters, prompt
tuning, P-tuning, prefix tuning: `peft` and its options), aggregated on the cloud side.

The ServerApp holds the global adapter and, unless told where one runs (`cloud-address`), hosts the one backbone
service every device trains through. Round r:

    train     strategy.configure_train -> the sampled devices train from the global adapter through the cloud
              (plain Flower messages, or SecAgg+ when `secagg` is on) -> strategy.aggregate_train merges the
              adapters (FedAvg of every trained weight, or FFA-LoRA for LoRA), the optional central-DP wrapper adds
              noise
    evaluate  `eval-nodes` devices each run a slice of the dev set with the new global adapter through the cloud
    report    loss, dev accuracy, Flower bytes down/up and adapter payload per device, split traffic per step,
              the merge's deviation from the true average of the clients' effective weights; one row per round in
              <out-dir>/report.json

The server builds the round-1 adapter with the devices' method at the devices' sites (`method_set`, from the same
settings as the devices' edge/methods.py `tuner_set`), seeded: every device starts from it. Round 0 evaluates it
(LoRA's B = 0, (IA)³'s vectors = 1 and the adapters' up = 0 leave the backbone as it is: zero-shot; prompt tuning's
random virtual tokens and prefixes do not). The arrays exchanged are the method's PEFT state dict, except
P-tuning's and prefix tuning's with a projection, whose devices exchange the encoder's weights (protocol/federation.py
`exchange`): PEFT saves only the encoder's output, and a set loaded from that trains the virtual tokens (prefixes)
without the encoder. At the end the global adapter is saved in PEFT format to <out-dir>/adapter (for P-tuning and a
prefix projection: the averaged encoder's output; bottleneck adapters in Tandem's format, which PEFT has not).
Settings that cannot run (a method with a --cloud-lora mode it has no wire pattern for, another method's options,
FFA-LoRA with a method that has no A to freeze) fail in `FederationConfig.check` with one line, before the backbone
loads. Configuration comes from the run config ([tool.flwr.app.config] in pyproject.toml, `flwr run . --run-config
...`), or, under `tandem federate`, from `make_server_app(config)`.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from logging import INFO
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore import log

from cloud.federation.adapters import effective_weights, initial_adapter, save_adapter
from cloud.federation.devices import BoundedGrid
from cloud.federation.secagg import SecAggConfig, secure_train_round
from cloud.federation.strategies import STRATEGIES, LoRAFedAvg
from cloud.federation.strategies.base import arrays_to_record, as_float64, lora_products, payload_bytes, record_to_arrays
from cloud.federation.traffic import MeteredGrid
from protocol.federation import DeviceSettings, kebab
from protocol.step import CloudLoRA
from model.load import load_model
from model.tuners import METHODS


FEDERATED = ("lora", "ia3", "adapter", "prompt", "ptuning", "prefix")  # the methods a federation trains (`method_set`)


@dataclass
class FederationConfig(DeviceSettings):
    """Everything a federation run is told: what every device is told (DeviceSettings), then the server's own.
    Run-config keys are these names in kebab-case (`num-server-rounds`); pyproject.toml lists them all."""
    num_server_rounds: int = 5  # federated rounds (round 0, before them, only evaluates)
    strategy: str = field(default="ffa", metadata={
        "choices": tuple(STRATEGIES), "help": "fedavg: every trained weight averaged (LoRA: FedIT, A and B apart); "
                                              "ffa: FFA-LoRA, A frozen, B averaged (exact; peft lora only)"})
    adapter_dtype: Literal["float32", "float16"] = "float32"  # the adapter in Flower messages
    fraction_train: float = 1.0  # fraction of the devices sampled to train each round
    min_nodes: int = 2  # devices to wait for before round 1, and the fewest a round trains with
    eval_nodes: int = 2  # devices that evaluate the global adapter each round, each on a slice of the dev set
    eval_initial: bool = True  # round 0: the initial adapter (B = 0, i.e. zero-shot)
    secagg: bool = False  # SecAgg+: the server only sees the sum of the masked adapters
    secagg_num_shares: float = 1.0  # SecAgg+: fraction of the round's devices each one shares its keys with
    secagg_threshold: float = 0.5  # SecAgg+: fraction of the shares needed to unmask a dropped device
    secagg_clipping_range: float = 8.0  # SecAgg+: |weight x parameter| is clipped to this before quantization
    secagg_quantization_range: int = 1 << 22  # SecAgg+: quantization levels of the masked values
    secagg_max_weight: float = 100_000.0  # SecAgg+: the largest device weight (its number of examples) expected
    dp: bool = False  # central DP: clients clip their update, the server adds Gaussian noise to the aggregate
    dp_noise_multiplier: float = 0.1  # central DP noise, x the clipping norm
    dp_clipping_norm: float = 1.0  # central DP: L2 norm each device's update is clipped to
    round_timeout: float = 3600.0  # seconds a round may take
    device_timeout: float = 600.0  # seconds to wait for min-nodes devices, and for a round's first answer: then fail
    out_dir: str = "runs/federation/flwr-run"  # report.json and the global adapter (PEFT format) go here
    label: str = ""  # the run's name in reports (empty: the strategy's)

    @classmethod
    def from_run_config(cls, run_config: dict) -> "FederationConfig":
        cfg = cls.from_keys(run_config, strict=True)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Settings that cannot run, each refused with one line naming the fix (run-config key names), before
        anything loads: the devices' edge/methods.py `check_method` would refuse them only once a round started."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        if self.cloud_lora not in get_args(CloudLoRA):
            raise ValueError(f"cloud-lora must be one of {', '.join(get_args(CloudLoRA))}, got {self.cloud_lora!r}")
        if self.peft not in METHODS:
            raise ValueError(f"peft must be one of {', '.join(METHODS)}, got {self.peft!r}")
        if self.peft not in FEDERATED:
            raise ValueError(f"peft {self.peft} has no federation yet (`method_set` builds it on the server): give "
                             f"peft {' or '.join(FEDERATED)}")
        method = METHODS[self.peft]
        if self.cloud_lora not in method.cloud_modes:
            raise ValueError(f"peft {self.peft} takes cloud-lora {' or '.join(method.cloud_modes)}, not "
                             f"{self.cloud_lora}" + (" (it trains nothing in the cloud's blocks)"
                                                     if method.kind == "input" else ""))
        defaults = DeviceSettings()
        for f in fields(DeviceSettings):
            owners = [m.name for m in METHODS.values() if f.name in m.options]
            if owners and self.peft not in owners and getattr(self, f.name) != getattr(defaults, f.name):
                raise ValueError(f"{kebab(f.name)} is an option of peft {' and '.join(owners)}, not of peft "
                                 f"{self.peft}")
        allowed = STRATEGIES[self.strategy].methods
        if allowed is not None and self.peft not in allowed:
            raise ValueError(f"strategy {self.strategy} merges peft {' or '.join(allowed)} only (FFA-LoRA freezes "
                             f"LoRA's A, which peft {self.peft} has not): give strategy \"fedavg\" (tandem federate: "
                             f"--strategies fedavg)")
        if self.lora_dora and self.cloud_lora == "edge":
            raise ValueError("lora-dora needs the base weights where its branch runs, and with cloud-lora edge the "
                             "devices have not the cloud's: use cloud-lora carried or none")
        if self.peft == "ptuning" and self.prompt_init_text:
            raise ValueError("prompt-init-text is prompt tuning's (peft prompt); P-tuning's encoder makes the tokens")
        if self.adapter_reduction < 1:
            raise ValueError(f"adapter-reduction must be at least 1, got {self.adapter_reduction}")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt-tokens must be at least 1, got {self.prompt_tokens}")
        if self.ptuning_hidden < 0:
            raise ValueError(f"ptuning-hidden must be at least 1 (0: the model's hidden size), got "
                             f"{self.ptuning_hidden}")
        if self.prefix_tokens < 1:
            raise ValueError(f"prefix-tokens must be at least 1, got {self.prefix_tokens}")
        if self.prefix_projection < 0:
            raise ValueError(f"prefix-projection must be at least 1 (the MLP's hidden size; 0: none), got "
                             f"{self.prefix_projection}")
        if self.exchange == "encoder" and self.local_steps < 1:
            raise ValueError(f"peft {self.peft} needs local-steps of at least 1: a device loads the round's encoder "
                             "weights at its first step")
        if self.emulator_devices and (not self.emulator_bundle or self.cloud_lora != "none"):
            raise ValueError("devices on the offsite emulator need emulator-bundle, and split training (cloud-lora "
                             "none): the emulator has no middle blocks to carry DLoRA's LoRA")
        if self.emulator_devices and (self.peft != "lora" or self.lora_dora or self.lora_rslora):
            raise ValueError("devices on the offsite emulator train plain LoRA (emulator/tune.py): give peft lora "
                             "without lora-dora and lora-rslora, or no emulator-devices")

    def instructions(self, address: str, token: str) -> ConfigRecord:
        """What every device is told each round: the DeviceSettings fields, with the cloud it trains through."""
        return self.record(cloud_address=address, cloud_token=token)


@lru_cache(maxsize=2)
def backbone(spec: str):
    """The backbone, loaded once per process (the ServerApp and a cloud it hosts share it)."""
    return load_model(spec, with_tokenizer=False).model


def make_strategy(cfg: FederationConfig, num_nodes: int, model=None):
    """(the strategy to run, the strategy inside it): the configured strategy, wrapped in Flower's central-DP wrapper
    (client-side clipping, server-side noise: it composes with SecAgg+) when `dp` is on. With the backbone (`model`)
    its deviation compares the method's effective weights (`effective_weights`); without, LoRA's B A, or for the
    other methods their parameters.
    A round samples `fraction-train` of the devices online then, never fewer than min-nodes: a device that drops out
    does not stall the next round while min-nodes remain."""
    per_round = max(int(num_nodes * cfg.fraction_train), min(2, num_nodes))
    effective = (effective_weights(model, cfg) if model is not None else
                 lora_products if cfg.peft == "lora" else as_float64)
    strategy: LoRAFedAvg = STRATEGIES[cfg.strategy](
        eval_nodes=cfg.eval_nodes, adapter_dtype=cfg.adapter_dtype, fraction_train=cfg.fraction_train,
        min_train_nodes=max(1, min(per_round, cfg.min_nodes)), min_available_nodes=min(cfg.min_nodes, num_nodes),
        effective=effective)
    if cfg.dp:
        return DifferentialPrivacyClientSideFixedClipping(strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm,
                                                          per_round), strategy
    return strategy, strategy


def _client_rows(replies: list[Message] | None, per_client: list[tuple[int, dict]], metered: MeteredGrid,
                 phase: tuple) -> list[dict]:
    if replies is not None:
        per_client = [(m.metadata.src_node_id, dict(next(iter(m.content.metric_records.values()))))
                      for m in replies if not m.has_error()]
    rows = []
    for node, met in sorted(per_client, key=lambda nm: nm[1].get("partition-id", 0)):
        flower = metered.counts[phase].get(node, {})
        rows.append({"node": node, "partition": int(met.get("partition-id", -1)), "examples": int(met["num-examples"]),
                     "mode": "emulator" if met.get("on-emulator") else "cloud",
                     "local_steps": int(met.get("local-steps", met.get("split-steps", 0))),
                     "train_loss": met.get("train-loss"), "train_seconds": met.get("train-seconds"),
                     "split_steps": int(met.get("split-steps", 0)),
                     "split_bytes_up": int(met.get("split-bytes-up", 0)),
                     "split_bytes_down": int(met.get("split-bytes-down", 0)),
                     "split_step_bytes_up": list(met.get("split-step-bytes-up", [])),
                     "split_step_bytes_down": list(met.get("split-step-bytes-down", [])),
                     "cloud_bytes_received": int(met.get("cloud-bytes-received", 0)),
                     "cloud_bytes_sent": int(met.get("cloud-bytes-sent", 0)),
                     "flower_bytes_down": int(flower.get("down", 0)), "flower_bytes_up": int(flower.get("up", 0)),
                     "adapter_bytes_down": int(flower.get("adapter_down", 0)),
                     "adapter_bytes_up": int(flower.get("adapter_up", 0))})
    return rows


def run_federation(grid: Grid, context: Context, cfg: FederationConfig, stop: threading.Event | None = None) -> dict:
    """All rounds; returns the report (also written to <out-dir>/report.json). Setting `stop` ends the run (it
    raises FederationStopped) within a second."""
    cfg.check()
    t_start = time.time()
    model = backbone(cfg.model)
    adapter = initial_adapter(model, cfg)  # before any device is waited for: the method's sites must exist
    cloud, address, token = None, cfg.cloud_address, cfg.cloud_token
    if not address:  # `flwr run .`: the backbone service lives with the ServerApp, on the cloud side
        from cloud.serve import Cloud, ServeConfig
        token = secrets.token_urlsafe(32)
        cloud = Cloud(ServeConfig(model=cfg.model, port=0), model=model, tokens={token: "federation"})
        address = cloud.address
        log(INFO, "Tandem: hosting the %s backbone service on %s", cfg.model, address)
    try:
        return _rounds(BoundedGrid(grid, cfg.device_timeout, stop), context, cfg, model, adapter, address, token,
                       t_start)
    finally:
        if cloud is not None:
            cloud.stop()


def _rounds(grid: BoundedGrid, context: Context, cfg: FederationConfig, model, adapter: dict[str, np.ndarray],
            address: str, token: str, t_start: float) -> dict:
    metered = MeteredGrid(grid)
    node_ids = grid.wait_for_nodes(cfg.min_nodes, "round 1")  # the devices connect
    strategy, inner = make_strategy(cfg, len(node_ids), model)
    arrays = arrays_to_record(adapter, "float32")
    wire = arrays_to_record(adapter, cfg.adapter_dtype)
    train_config = cfg.instructions(address, token)
    eval_config = cfg.instructions(address, token)
    out = Path(cfg.out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"label": cfg.label or cfg.strategy, "strategy": cfg.strategy, "nodes": len(node_ids),
              "config": {k: v for k, v in asdict(cfg).items() if k != "cloud_token"},
              "adapter": {"method": cfg.peft, "exchange": cfg.exchange, "keys": len(adapter),
                          "parameters": int(sum(a.size for a in adapter.values())),
                          "dtype": cfg.adapter_dtype, "bytes": payload_bytes(wire)},
              "rounds": []}

    def evaluate(rnd: int, arrays: ArrayRecord) -> dict:
        metered.phase = ("evaluate", rnd)
        replies = metered.send_and_receive(strategy.configure_evaluate(rnd, arrays, eval_config, metered),
                                           timeout=cfg.round_timeout)
        metrics = strategy.aggregate_evaluate(rnd, replies)
        t = metered.totals(metered.phase)
        ok = [m for m in replies if not m.has_error()]
        split = sum(int(next(iter(m.content.metric_records.values())).get("cloud-bytes-received", 0)) +
                    int(next(iter(m.content.metric_records.values())).get("cloud-bytes-sent", 0)) for m in ok)
        return {"dev_accuracy": None if metrics is None else metrics.get("accuracy"),
                "dev_perplexity": None if metrics is None else metrics.get("perplexity"),
                "dev_examples": 0 if metrics is None else int(metrics.get("num-examples", 0)),
                "eval_flower_bytes": t.get("down", 0) + t.get("up", 0), "eval_split_bytes": split}

    t0 = time.time()
    row0 = {"round": 0, **(evaluate(0, arrays) if cfg.eval_initial else {"dev_accuracy": None}),
            "seconds": time.time() - t0}
    report["rounds"].append(row0)
    log(INFO, "Tandem round 0 (initial adapter): dev accuracy %s", row0["dev_accuracy"])
    secagg = SecAggConfig(cfg.secagg_num_shares, cfg.secagg_threshold, cfg.secagg_clipping_range,
                          cfg.secagg_quantization_range, cfg.secagg_max_weight)
    for rnd in range(1, cfg.num_server_rounds + 1):
        t0 = time.time()
        grid.wait_for_nodes(max(inner.min_available_nodes, inner.min_train_nodes), f"round {rnd}")
        arrays, row, clients = _train_round(rnd, arrays, cfg, strategy, metered, context, train_config, secagg)
        row.update(evaluate(rnd, arrays))
        row["seconds"] = time.time() - t0
        row["clients"] = clients
        report["rounds"].append(row)
        log(INFO, "Tandem round %d: loss %.4f, dev accuracy %s, Flower %d B down / %d B up, split %.0f B/step, "
            "deviation %s", rnd, row["train_loss"] or float("nan"), row["dev_accuracy"], row["flower_bytes_down"],
            row["flower_bytes_up"], row["split_bytes_per_step"], row["deviation"])
    final = record_to_arrays(arrays)
    save_adapter(model, cfg, final, out / "adapter")
    report["seconds"] = time.time() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _train_round(rnd: int, arrays: ArrayRecord, cfg: FederationConfig, strategy, metered: MeteredGrid,
                 context: Context, train_config: ConfigRecord, secagg: SecAggConfig):
    """One round of training and aggregation: (the new global adapter, the round's row, its per-device rows)."""
    t0 = time.time()
    metered.phase = ("train", rnd)
    messages = list(strategy.configure_train(rnd, arrays, train_config, metered))
    if cfg.secagg:
        replies, per_client = secure_train_round(metered, context, rnd, messages, secagg)
        clients = _client_rows(None, per_client, metered, metered.phase)
    else:
        replies = list(metered.send_and_receive(messages, timeout=cfg.round_timeout))
        clients = _client_rows(replies, [], metered, metered.phase)
    new_arrays, metrics = strategy.aggregate_train(rnd, replies)
    if new_arrays is None:
        raise RuntimeError(f"round {rnd}: no adapter to aggregate (every device failed?)")
    t = metered.totals(metered.phase)
    steps = sum(c["split_steps"] for c in clients)
    split_up = sum(c["split_bytes_up"] for c in clients)
    split_down = sum(c["split_bytes_down"] for c in clients)
    row = {"round": rnd, "devices": len(clients), "train_loss": metrics.get("train-loss"),
           "flower_bytes_down": t.get("down", 0), "flower_bytes_up": t.get("up", 0),
           "adapter_bytes_down": t.get("adapter_down", 0), "adapter_bytes_up": t.get("adapter_up", 0),
           "flower_messages": t.get("messages_down", 0) + t.get("messages_up", 0),
           "split_steps": steps, "split_bytes_up": split_up, "split_bytes_down": split_down,
           "split_bytes_per_step": (split_up + split_down) / steps if steps else 0.0,
           "deviation": metrics.get("agg-deviation"), "train_seconds": time.time() - t0}
    return arrays_to_record(record_to_arrays(new_arrays), "float32"), row, clients


def make_server_app(cfg: FederationConfig, stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp with its configuration built in (Flower's `run_simulation` passes no run config); setting `stop`
    ends it."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, cfg, stop)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context, FederationConfig.from_run_config(dict(context.run_config)))
