"""What a federation's devices are told, defined once: the ServerApp's run config and each round's ConfigRecord.

    DeviceSettings   the settings every device gets each round; FederationConfig (cloud/federation/server_app.py)
                     adds the server's own on top, and its fields are the run-config keys in kebab-case
                     ([tool.flwr.app.config] in pyproject.toml; `flwr run . --run-config 'num-server-rounds=2'`)
    Instructions     what a device reads: DeviceSettings, what the strategy adds per round, and its node config

Keys are the field names in kebab-case (`cut_bottom` -> `cut-bottom`), in both directions.

Each round's arrays are the PEFT method's trainable weights in the form `exchange` names: PEFT's state dict of the
method (what `save_peft` writes: LoRA's A and B, DoRA's magnitudes, (IA)³'s vectors, the bottleneck adapters' weights,
prompt tuning's virtual tokens, prefix tuning's prefix table),
except for P-tuning and prefix tuning with a projection, whose PEFT form is only the encoder's output: their devices
exchange the encoder's own weights (`PromptSet.state_dict()`, `PrefixSet.state_dict()`: the table and the MLP), and
only the federation's final adapter is written in PEFT's form.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

from flwr.app import ConfigRecord

from protocol.step import CloudLoRA
from protocol.tensors import Wire


def kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class DeviceSettings:
    model: str = "smollm2"  # backbone spec (model.load): smollm2, tiny-llama, or a Hugging Face model folder
    task: str = "sst2"  # the task (tasks.TASKS)
    cut_bottom: int = 1  # k: blocks at the bottom of the edge
    cut_top: int = 1  # m: blocks at the top of the edge
    cloud_lora: CloudLoRA = "edge"  # edge: DLoRA (LoRA in every block, on the device); carried; none: split
    peft: str = "lora"  # what every device trains: lora, ia3, adapter, prompt, ptuning, prefix (model/tuners/)
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator (the update is scaled by alpha / r)
    lora_targets: str = "q_proj,v_proj"  # comma-separated linear layers that get LoRA
    lora_dora: bool = False  # LoRA: DoRA, a magnitude vector per site (PEFT's use_dora); not with cloud-lora edge
    lora_rslora: bool = False  # LoRA: rsLoRA, the update scaled by alpha / sqrt(r) (PEFT's use_rslora)
    ia3_targets: str = ""  # (IA)³: comma-separated linears rescaled (empty: PEFT's default for the model)
    ia3_feedforward: str = ""  # (IA)³: of those, the ones scaled at their input (empty: PEFT's default)
    adapter_reduction: int = 16  # adapter: bottleneck width = the site's output width / this (Houlsby's 16)
    adapter_targets: str = ""  # adapter: comma-separated linears followed by an adapter (empty: o_proj, down_proj)
    prompt_tokens: int = 20  # prompt, ptuning: virtual tokens prepended to every input
    prompt_init_text: str = ""  # prompt: the virtual tokens start from this text's embeddings (empty: random)
    ptuning_hidden: int = 0  # ptuning: hidden size of the prompt encoder's MLP (0: the model's)
    prefix_tokens: int = 20  # prefix: virtual keys and values put in front of every layer's attention
    prefix_projection: int = 0  # prefix: hidden size of the MLP that makes them (Li & Liang; 0: none, P-tuning v2)
    local_steps: int = 4  # training steps per device per round
    batch_size: int = 8  # training examples per step
    lr: float = 2e-3  # AdamW learning rate on the devices
    seed: int = 0  # LoRA initialisation; each device's batches use seed + 1000 x round + partition id
    wire_up: Wire = "fp32"  # split traffic dtype, edge -> cloud
    wire_down: Wire = "fp32"  # split traffic dtype, cloud -> edge
    partition_dir: str = ""  # client-<partition-id>.jsonl per device; empty: IID shards of the shared set
    eval_examples: int = 200  # dev examples of a federated evaluation (split among the evaluating devices)
    eval_batch_size: int = 32  # dev examples per forward pass
    emulator_bundle: str = ""  # an offsite bundle folder (`tandem offsite build`) ...
    emulator_devices: str = ""  # ... and the partition ids that train locally on it: "0,3" or "all"
    cloud_address: str = ""  # the backbone service every device trains through; empty: the ServerApp hosts one
    cloud_token: str = ""  # its bearer token
    cloud_tls_dir: str = ""  # on each device: a folder with the CA (ca.pem) the backbone's certificate is signed by

    @classmethod
    def from_keys(cls, *sources: Mapping, strict: bool = False):
        """From kebab-case keys (later sources win). Keys that are no field are ignored, or with `strict` refused."""
        known = {f.name for f in fields(cls)}
        values = {}
        for source in sources:
            for key, value in source.items():
                name = key.replace("-", "_")
                if name in known:
                    values[name] = value
                elif strict:
                    raise ValueError(f"unknown federation setting {key!r}; known: {sorted(map(kebab, known))}")
        return cls(**values)

    @property
    def targets(self) -> tuple[str, ...]:
        """lora-targets as a tuple."""
        return tuple(t for t in self.lora_targets.split(",") if t)

    @property
    def method_options(self) -> dict:
        """The PEFT method's options by flag name, as model/tuners `method_set` takes them and the devices' edge gives
        them (edge/methods.py): comma-separated lists as tuples, 0 or "" (unset) as None; devices apply no dropout."""
        names = ("lora_r", "lora_alpha", "lora_dora", "lora_rslora", "adapter_reduction", "prompt_tokens",
                 "prefix_tokens")
        return {**{n: getattr(self, n) for n in names}, "lora_dropout": 0.0, "lora_targets": self.targets,
                **{n: csv(getattr(self, n)) for n in ("ia3_targets", "ia3_feedforward", "adapter_targets")},
                **{n: getattr(self, n) or None for n in ("prompt_init_text", "ptuning_hidden", "prefix_projection")}}

    @property
    def exchange(self) -> str:
        """What a round's arrays hold (module docstring): "peft", the method's PEFT state dict, or "encoder", the
        encoder's weights of P-tuning or of prefix tuning with a projection (PEFT saves only their output)."""
        return "encoder" if self.peft == "ptuning" or (self.peft == "prefix" and self.prefix_projection) else "peft"

    def record(self, **override) -> ConfigRecord:
        """The device settings (DeviceSettings' fields, not a subclass's) as a round's ConfigRecord."""
        return ConfigRecord({kebab(f.name): override.get(f.name, getattr(self, f.name))
                             for f in fields(DeviceSettings)})


def csv(text: str) -> tuple[str, ...]:
    """A comma-separated setting as a tuple."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def exchanged_state(tuners, settings: DeviceSettings) -> dict:
    """A method's set of trainable weights (model/tuners/: LoRASet, IA3Set, AdapterSet, PromptSet, PrefixSet) in a
    round's form."""
    if settings.exchange == "encoder":
        return {k: v.detach().cpu().contiguous() for k, v in tuners.state_dict().items()}
    return tuners.peft_state_dict()


def load_exchanged(tuners, state: Mapping, settings: DeviceSettings) -> None:
    """Put a round's arrays (tensors, in `exchanged_state`'s form) into a method's set."""
    if settings.exchange == "encoder":
        if set(state) != set(tuners.state_dict()):
            raise ValueError(f"the peft {settings.peft} round carries the encoder's weights; these arrays are not "
                             f"this encoder's: {sorted(set(state) ^ set(tuners.state_dict()))[:3]}")
        tuners.load_state_dict(dict(state))
    else:
        tuners.load_peft_state_dict(dict(state))


@dataclass
class Instructions(DeviceSettings):
    """One round's instructions to a device: the server's ConfigRecord, then its node config (which wins)."""
    freeze_a: bool = False  # set by the strategy: FFA-LoRA trains B only
    server_round: int = 0  # set by the strategy
    dev_shard: int = 0  # evaluate: this device's slice of the dev set ...
    dev_shards: int = 1  # ... out of this many
    partition_id: int = 0  # node config (set by the simulation)
    num_partitions: int = 1  # node config
    train_file: str = ""  # node config: the device's own training file
    train_mode: str = ""  # node config: "cloud" or "emulator" (empty: as emulator-devices says)

    @classmethod
    def read(cls, config: Mapping, node_config: Mapping) -> "Instructions":
        return cls.from_keys(config, node_config)

    @property
    def on_emulator(self) -> bool:
        """This device trains locally on the offsite emulator (its node config says so, or the server's list does)."""
        if self.train_mode:
            if self.train_mode not in ("cloud", "emulator"):
                raise ValueError(f"train-mode must be 'cloud' or 'emulator', got {self.train_mode!r}")
            return self.train_mode == "emulator"
        chosen = {d.strip() for d in self.emulator_devices.split(",") if d.strip()}
        return "all" in chosen or str(self.partition_id) in chosen

    @property
    def seed_this_round(self) -> int:
        return self.seed + 1000 * self.server_round + self.partition_id  # new batches every round
