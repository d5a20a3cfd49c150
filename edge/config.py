"""The edge's configuration: one dataclass per concern, nested in EdgeConfig.

`tandem edge train` has one flag per field (edge/flags.py): the field's name, prefixed by its group where the group
says so (--lora-r, --kr-warmup, --noise-sigma, --eval-examples), each documented by its comment here. Code builds
one the same way, by flag name: `EdgeConfig.of(cloud="host:port", cloud_lora="edge", steps=10)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import tasks as T
from edge.flags import build
from edge.killrevive import KRConfig
from edge.link import LinkConfig
from model.load import DTYPES
from model.tuners import METHODS
from protocol.step import CloudLoRA
from protocol.tensors import Wire


@dataclass
class DataConfig:
    task: str = field(default="sst2", metadata={"choices": tuple(T.TASKS)})  # the task (tasks.TASKS)
    task_file: str | None = None  # a JSON task file (prompt, labels; tasks/custom.py) instead of --task
    train_file: str | None = None  # a user's own data (TSV/CSV/JSONL) instead of the shared set
    dev_file: str | None = None  # ... and its dev set
    shard: int = 0  # this client's shard of the training set ...
    num_shards: int = 1  # ... out of this many


@dataclass
class LoRAOptions:
    cloud: CloudLoRA = field(default="none", metadata={
        "flag": "cloud_lora", "help": "none: the cloud blocks are frozen (split); edge: DLoRA, their LoRA computed on "
                                      "the edge; carried: their LoRA (or DoRA, (IA)³) weights ride each step, "
                                      "gradients come back"})
    r: int = 8  # LoRA rank
    alpha: int = 16  # LoRA scale numerator (the update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the LoRA input
    targets: tuple[str, ...] = ()  # linear layers that get LoRA, named as PEFT names them (default: the family's)
    freeze_a: bool = False  # FFA-LoRA: train B only (federated averaging of B is then exact)
    dora: bool = False  # DoRA: a magnitude vector per site (PEFT's use_dora); not with --cloud-lora edge
    rslora: bool = False  # rsLoRA: scale by alpha / sqrt(r) (PEFT's use_rslora)


@dataclass
class PeftOptions:
    method: str = field(default="lora", metadata={
        "flag": "peft", "choices": tuple(METHODS),
        "help": "the PEFT method: lora (LoRA, --lora-dora, --lora-rslora), ia3 ((IA)³ scaling vectors), prompt "
                "(prompt tuning), ptuning (P-tuning's prompt encoder), prefix (prefix tuning, P-tuning v2: keys and "
                "values in every layer; with --cloud-lora carried), adapter (bottleneck adapters); model/tuners/"})
    ia3_targets: tuple[str, ...] = ()  # (IA)³: linears rescaled, named as PEFT names them; none: PEFT's for the model
    ia3_feedforward: tuple[str, ...] = ()  # (IA)³: of those, the ones scaled at their input; none: PEFT's
    adapter_reduction: int = 16  # adapter: bottleneck width = the site's output width / this (Houlsby's 16)
    adapter_targets: tuple[str, ...] = ()  # adapter: linears followed by an adapter; none: the attention and MLP outputs
    prompt_tokens: int = 20  # prompt, ptuning: virtual tokens prepended to every input
    prompt_init_text: str | None = None  # prompt: start the virtual tokens from this text's embeddings; none: random
    ptuning_hidden: int | None = None  # ptuning: hidden size of the prompt encoder's MLP; none: the model's
    prefix_tokens: int = 20  # prefix: virtual keys and values put in front of every layer's attention
    prefix_projection: int | None = None  # prefix: make them with an MLP of this hidden size (Li & Liang); none: P-tuning v2


@dataclass
class NoiseConfig:
    sigma: float = 0.0  # privacy/defences/noise.py: Gaussian noise on the hidden state sent to the cloud, x its RMS
    clip: float | None = None  # ... after clipping each token's hidden vector to this L2 norm (not DP)
    label_mask: float | None = field(default=None, metadata={
        "help": "privacy/defences/labels.py: scale each example's gradient sent to the cloud by a secret random "
                "sign x factor in [1/R, R], divided out on its way back (not with --cloud-lora carried)"})
    nopeek: float = field(default=0.0, metadata={
        "help": "privacy/defences/nopeek.py: add this weight x the distance correlation between the input token "
                "embeddings and the hidden state sent to the cloud to the edge's loss (NoPeek; the edge's own "
                "trainable weights below the cut learn it)"})
    template_only: bool = field(default=False, metadata={
        "help": "privacy/defences/template.py: send the cloud the prompt template's positions only; the example's own "
                "tokens' rows go as zeros, masked out (classification tasks whose template starts and ends with text)"})
    label_free: bool = field(default=False, metadata={
        "help": "privacy/defences/labels.py: send the cloud the gradient of the label words' logit margin, which "
                "does not depend on the label, and scale what comes back by dL/dmargin on the edge (two-class "
                "tasks; trains the two-way label-word loss; not with --cloud-lora carried)"})


@dataclass
class OptimConfig:
    lr: float = 1e-3  # AdamW learning rate (no weight decay)
    steps: int = 100  # training steps (updates; one batch each, --grad-accum-steps batches with accumulation)
    batch_size: int = 8  # training examples per step
    seed: int = 0  # LoRA initialisation and batch order
    checkpoint_every: int = 50  # steps between checkpoints in --out-dir (0: only at the end)
    warmup_steps: int = 0  # steps whose learning rate rises linearly from 0 to --lr (0: no warmup)
    schedule: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={
        "help": "learning rate after the warmup: constant, or a linear / cosine decay to 0 at --steps"})
    max_grad_norm: float | None = field(default=None, metadata={
        "help": "clip the gradients' total L2 norm to this before each update (default: no clipping)"})
    grad_accum_steps: int = field(default=1, metadata={
        "help": "batches of --batch-size per step, each its own cloud step; their gradients add up, one update"})


@dataclass
class EvalConfig:
    examples: int = 100  # dev examples evaluated (the first ones); the demo and the benches report 500
    batch_size: int = 32  # dev examples per forward pass
    before: bool = True  # evaluate before training (zero-shot)
    after: bool = True  # evaluate after training


@dataclass
class EdgeConfig:
    link: LinkConfig = field(default_factory=lambda: LinkConfig("127.0.0.1:50051"),
                             metadata={"flags": {"address": "cloud"}, "title": "cloud link", "helps": {
                                 "client_name": "mutual TLS: present <tls-dir>/<client-name>.pem; None: --name's, "
                                                "when <tls-dir> has that certificate"}})
    model: str = "smollm2"  # backbone spec: smollm2, tiny-llama, tiny-gpt2 or a Hugging Face model folder
    data: DataConfig = field(default_factory=DataConfig, metadata={"title": "data"})
    k: int = 1  # blocks at the bottom of the model that run on the edge
    m: int = 1  # blocks at the top of the model that run on the edge
    wire_up: Wire = "fp32"  # dtype of what the edge sends (hidden states, gradients)
    wire_down: Wire = "fp32"  # dtype of what the cloud sends back
    peft: PeftOptions = field(default_factory=PeftOptions, metadata={"title": "PEFT method"})
    lora: LoRAOptions = field(default_factory=LoRAOptions, metadata={"prefix": "lora", "title": "LoRA"})
    kr: KRConfig = field(default_factory=KRConfig, metadata={"prefix": "kr", "title": "Kill & Revive (DLoRA)"})
    noise: NoiseConfig = field(default_factory=NoiseConfig,
                               metadata={"prefix": "noise", "title": "noise on what is sent (not DP)"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"title": "optimisation"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"prefix": "eval", "title": "evaluation"})
    out_dir: str | None = None  # adapter (PEFT format), checkpoint, config.json and metrics.json go here
    init_adapter: str | None = None  # start from this PEFT adapter folder (e.g. another run's <out-dir>/adapter)
    tensorboard: str | None = None  # write loss, learning rate and bytes per step to this folder for TensorBoard
    dtype: str = field(default="float32", metadata={"choices": tuple(DTYPES)})  # dtype of the edge's weights
    device: str = "cpu"  # torch device of the edge's model (cpu, cuda, mps)
    progress: bool = True  # progress bars
    progress_row: int = 0  # terminal row of this client's progress bar (several clients in one terminal)
    name: str = "edge"  # this client's one identity: its name in tables, its entry in --token-file, its TLS certificate

    @classmethod
    def of(cls, **flags) -> "EdgeConfig":
        """The config these flags give (names as on the command line, underscores for dashes)."""
        return build(cls, flags, strict=True)

    def public(self) -> dict:
        """The config as plain data, without the bearer token: what metrics.json records."""
        out = asdict(self)
        out["link"].pop("token", None)
        return out
