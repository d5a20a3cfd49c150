"""The edge client: private data, the edge segments, every LoRA weight, and an ordinary PyTorch training loop.

    bottom (embedding + k blocks, local LoRA)  ->  RemoteCloud (cloud blocks over gRPC)  ->  top (m blocks, norm,
    LM head, loss)

Modes (`cloud_lora`): "none" — the cloud blocks are frozen and carry no LoRA (split training); "edge" — DLoRA: the
cloud blocks carry LoRA too, computed and trained here on the edge from the LoRA inputs the cloud sends.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import tasks as T
from edge.link import CloudLink, LinkConfig, StepFailed
from protocol.step import Traffic
from edge.remote import RemoteCloud
from model.load import DTYPES, fingerprint, load_model
from model.lora import LoRAConfig, LoRASet
from model.segments import EdgeBottom, EdgeTop, cut_of, drop_blocks
from privacy.defences.noise import add_gaussian_noise, clip_rows, rms
from protocol.tensors import wire_dtype



@dataclass
class EdgeConfig:
    cloud: str = "127.0.0.1:50051"
    token: str | None = None
    tls_dir: str | None = None
    client_name: str | None = None
    model: str = "smollm2"
    task: str = "sst2"
    train_file: str | None = None  # a user's own data instead of the shared set
    dev_file: str | None = None
    shard: int = 0  # this client's shard of the training set ...
    num_shards: int = 1  # ... out of this many
    k: int = 1
    m: int = 1
    cloud_lora: str = "none"  # "none" (frozen cloud) or "edge" (DLoRA)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_freeze_a: bool = False  # FFA-LoRA: train B only (federated averaging of B is then exact)
    kr: bool = False  # DLoRA Kill & Revive (edge/killrevive.py); the kr_* options are its thresholds
    kr_warmup: int = 10
    kr_threshold: float = 1.0
    kr_min_active: float = 0.3
    kr_revive_every: int = 25
    kr_signal: str = "update"  # what a module's score measures: "update" (relative update) or "grad" (gradient norm)
    noise_sigma: float = 0.0  # privacy/defences/noise.py: Gaussian noise on the hidden state sent to the cloud, x its RMS
    noise_clip: float | None = None  # ... after clipping each token's hidden vector to this L2 norm (not DP)
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    seed: int = 0
    wire_up: str = "fp32"
    wire_down: str = "fp32"
    eval_examples: int = 500
    eval_batch_size: int = 32
    eval_before: bool = True
    eval_after: bool = True
    out_dir: str | None = None  # adapter, checkpoint and metrics go here
    checkpoint_every: int = 50
    retries: int = 6  # per step, with exponential backoff; a lost session is reopened
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True
    progress_row: int = 0  # terminal row of this client's progress bar (several clients in one terminal)
    name: str = "edge"


@dataclass
class StepRecord:
    step: int
    loss: float
    bytes_up: int
    bytes_down: int
    payload_up: int
    payload_down: int
    messages_up: int
    messages_down: int
    edge_seconds: float
    cloud_seconds: float
    step_seconds: float
    active_blocks: list[int] = field(default_factory=list)


class EdgeModel(nn.Module):
    """The edge's whole model: bottom, the cloud stand-in, top. `lora` holds every trainable weight."""

    def __init__(self, model, cfg: EdgeConfig, link: CloudLink | None):
        super().__init__()
        cut = cut_of(model, cfg.k, cfg.m)
        self.cut, self.task = cut, T.TASKS[cfg.task]
        local = [*cut.bottom, *cut.top]
        remote_blocks = list(cut.cloud) if cfg.cloud_lora == "edge" else []
        self.lora = LoRASet(model, LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets),
                                              sorted(local + remote_blocks)))
        self.lora.to(device=cfg.device, dtype=DTYPES[cfg.dtype])
        self.fingerprint = fingerprint(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.lora.attach(model, local)
        drop_blocks(model, cut.cloud)  # the edge never holds the cloud's weights
        self.bottom, self.top = EdgeBottom(model, cut), EdgeTop(model, cut)
        self.cloud = RemoteCloud(link, wire_dtype(cfg.wire_up), wire_dtype(cfg.wire_down),
                                 self.lora if remote_blocks else None, remote_blocks, cfg.lora_targets)
        self.noise_sigma, self.noise_clip = cfg.noise_sigma, cfg.noise_clip

    def hidden(self, batch: T.Batch) -> torch.Tensor:
        h = self.bottom(batch.input_ids, batch.attention_mask)
        if self.noise_clip is not None:  # what leaves the device is clipped, then noised (privacy/defences/noise.py)
            h = clip_rows(h, self.noise_clip)
        if self.noise_sigma > 0:  # sigma relative to the RMS of what is sent, over real tokens
            h = add_gaussian_noise(h, self.noise_sigma * rms(h.detach(), batch.attention_mask))
        h = self.cloud(h, batch.attention_mask)
        return self.top(h, batch.attention_mask)

    def loss(self, batch: T.Batch):
        return T.loss_from_hidden(self.task, self.hidden(batch), batch, self.top.lm_head)


def build_edge(cfg: EdgeConfig, *, loaded=None, link: CloudLink | None = None):
    """Load the model, cut it, connect and open a session. Returns (edge_model, tokenizer, link)."""
    if cfg.cloud_lora not in ("none", "edge"):
        raise ValueError("cloud_lora must be 'none' or 'edge'")
    torch.manual_seed(cfg.seed)
    loaded = loaded or load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device)
    link = link or CloudLink(LinkConfig(cfg.cloud, cfg.token, cfg.tls_dir, cfg.client_name))
    em = EdgeModel(loaded.model, cfg, link)
    open_session(em, cfg)
    return em, loaded.tokenizer or T.tiny_tokenizer(), link


def open_session(em: EdgeModel, cfg: EdgeConfig):
    return em.cloud.link.open(fingerprint=em.fingerprint, k=cfg.k, m=cfg.m, wire_up=wire_dtype(cfg.wire_up),
                              wire_down=wire_dtype(cfg.wire_down),
                              lora_targets=cfg.lora_targets if em.cloud.lora_blocks else (),
                              lora_blocks=em.cloud.lora_blocks)


# A step that fails for one of these reasons is retried; the others are the caller's mistake and are raised.
RETRY = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "INTERNAL", "RESOURCE_EXHAUSTED"}


def _train_step(em: EdgeModel, cfg: EdgeConfig, batch, opt, retries: int, backoff: float = 1.0):
    """Forward, backward through the cloud, with retries. A lost session (the cloud restarted, or it expired) is
    opened again: the cloud holds nothing the edge needs, so training resumes where it was."""
    for attempt in range(retries + 1):
        try:
            opt.zero_grad(set_to_none=True)
            loss, _ = em.loss(batch)
            loss.backward()
            return loss
        except StepFailed as e:
            code = e.code.name if e.code is not None else "UNKNOWN"
            if attempt == retries or code not in RETRY:
                raise
            time.sleep(min(backoff * 2 ** attempt, 30.0))
            if code in ("NOT_FOUND", "UNAVAILABLE"):
                try:
                    open_session(em, cfg)
                except StepFailed:
                    pass  # still down: the next attempt waits longer


def load_items(cfg: EdgeConfig, tokenizer, split: str) -> list[dict]:
    task = T.TASKS[cfg.task]
    path = cfg.train_file if split == "train" else cfg.dev_file
    items = T.encode(task, T.load_split(cfg.task, split, path), tokenizer)
    if split == "train":
        items = items[cfg.shard::cfg.num_shards]
    else:
        items = items[:cfg.eval_examples]
    return items


@torch.no_grad()
def evaluate(em: EdgeModel, items: list[dict], pad_id: int, batch_size: int = 32, label_ids=None,
             desc: str | None = None, position: int = 0) -> dict:
    """Classification: accuracy from the label words' logits. LM: perplexity. Runs through the cloud like training."""
    from tqdm import tqdm
    task = em.task
    killed, em.cloud.killed = em.cloud.killed, set()  # the model being evaluated has every LoRA module
    correct, n, nll, ntok = 0, 0, 0.0, 0
    items = sorted(items, key=lambda it: len(it["ids"]))  # similar lengths share a batch: less padding, same result
    total = -(-len(items) // batch_size)
    for batch in tqdm(T.batches(task, items, batch_size, pad_id), total=total, desc=desc, disable=desc is None,
                      position=position, leave=False, dynamic_ncols=True):
        loss, logits = em.loss(batch)
        if task.kind == "lm":
            nll += loss.item() * batch.target.numel()
            ntok += batch.target.numel()
        else:
            pred = logits[:, label_ids].argmax(-1)
            correct += (pred == batch.label).sum().item()
            n += len(batch)
    em.cloud.killed = killed
    if task.kind == "lm":
        return {"perplexity": float(torch.exp(torch.tensor(nll / ntok))), "tokens": ntok}
    return {"accuracy": correct / n, "examples": n}


def _infinite_batches(task, items, batch_size, pad_id, seed):
    epoch = 0
    while True:
        yield from T.batches(task, items, batch_size, pad_id, seed=seed + epoch, drop_last=len(items) >= batch_size)
        epoch += 1


def train(cfg: EdgeConfig, *, loaded=None, link: CloudLink | None = None, on_step=None,
          step_hook=None, initial_adapter: dict | None = None) -> dict:
    """Train, evaluate, save. Returns the metrics dict (also written to out_dir/metrics.json).

    `on_step(record)` sees every step (live printing); `step_hook(em, step)` runs before each step (Kill & Revive);
    `initial_adapter` (PEFT-format state dict) starts from given LoRA weights (a federated round's global adapter).
    metrics["_edge_model"] is the trained EdgeModel (its `.lora.peft_state_dict()` is the adapter).
    """
    from tqdm import tqdm
    em, tok, link = build_edge(cfg, loaded=loaded, link=link)
    task, pad_id = em.task, tok.pad_token_id if tok.pad_token_id is not None else 0
    label_ids = T.label_token_ids(task, tok) if task.kind == "classify" else None
    if initial_adapter is not None:
        em.lora.load_peft_state_dict(initial_adapter)
    if cfg.lora_freeze_a:
        for name, p in em.lora.named_parameters():
            p.requires_grad_("lora_A" not in name)
    train_items = load_items(cfg, tok, "train")
    dev_items = load_items(cfg, tok, "dev") if (cfg.eval_before or cfg.eval_after) else []
    opt = torch.optim.AdamW([p for p in em.lora.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    start, records = 0, []
    if out and (out / "checkpoint.pt").exists():  # resume after a crash: nothing is lost
        ck = torch.load(out / "checkpoint.pt", weights_only=False)
        em.lora.load_state_dict(ck["lora"])
        opt.load_state_dict(ck["opt"])
        start, records = ck["step"], [StepRecord(**r) for r in ck["records"]]
    metrics = {"config": asdict(cfg), "cut": {"k": cfg.k, "m": cfg.m, "cloud_blocks": list(em.cut.cloud)},
               "trainable_parameters": sum(p.numel() for p in em.lora.parameters())}
    if cfg.eval_before and start == 0:
        metrics["eval_before"] = evaluate(em, dev_items, pad_id, cfg.eval_batch_size, label_ids,
                                          f"{cfg.name} dev (before)" if cfg.progress else None, cfg.progress_row)
    batches = _infinite_batches(task, train_items, cfg.batch_size, pad_id, cfg.seed)
    for _ in range(start):  # resume at the same batch
        next(batches)
    kr = None
    if cfg.kr and em.cloud.lora_blocks:
        from edge.killrevive import KillRevive, KRConfig
        kr = KillRevive(em.cloud.lora_blocks, KRConfig(warmup=cfg.kr_warmup, threshold=cfg.kr_threshold,
                                                       min_active=cfg.kr_min_active, revive_every=cfg.kr_revive_every,
                                                       signal=cfg.kr_signal))
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.name} train", disable=not cfg.progress,
               position=cfg.progress_row, dynamic_ncols=True)
    em.train()
    for step in range(start, cfg.steps):
        if kr:
            kr.before_step(em, step, records[-1].loss if records else None)
        if step_hook:
            step_hook(em, step)
        batch = next(batches).to(cfg.device)
        em.cloud.step = step
        t0 = time.perf_counter()
        loss = _train_step(em, cfg, batch, opt, cfg.retries)
        opt.step()
        dt = time.perf_counter() - t0
        tr: Traffic = em.cloud.last_traffic
        rec = StepRecord(step, loss.item(), tr.bytes_up, tr.bytes_down, tr.payload_up, tr.payload_down,
                         tr.messages_up, tr.messages_down, dt - tr.wait_seconds, tr.cloud_seconds, dt,
                         em.cloud.active_blocks())
        records.append(rec)
        if on_step:
            on_step(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec.loss:.3f}", up_kB=f"{rec.bytes_up / 1e3:.0f}", down_kB=f"{rec.bytes_down / 1e3:.0f}")
        if out and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(out, em, opt, step + 1, records)
    bar.close()
    em.eval()
    if cfg.eval_after:
        metrics["eval_after"] = evaluate(em, dev_items, pad_id, cfg.eval_batch_size, label_ids,
                                         f"{cfg.name} dev (after)" if cfg.progress else None, cfg.progress_row)
    metrics["steps"] = [asdict(r) for r in records]
    metrics["summary"] = summarize(records)
    if em.cloud.lora_blocks:
        metrics["summary"]["active_fraction"] = (sum(len(r.active_blocks) for r in records)
                                                 / max(1, len(records) * len(em.cloud.lora_blocks)))
    stats = link.close()
    if stats is not None:
        metrics["cloud_session"] = {"steps": stats.steps, "bytes_received": stats.bytes_received,
                                    "bytes_sent": stats.bytes_sent}
    if out:
        em.lora.save_peft(out / "adapter", cfg.model)
        save_checkpoint(out, em, opt, cfg.steps, records)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    metrics["_edge_model"] = em
    return metrics


def save_checkpoint(out: Path, em: EdgeModel, opt, step: int, records: list[StepRecord]):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "checkpoint.pt.tmp"
    torch.save({"lora": em.lora.state_dict(), "opt": opt.state_dict(), "step": step,
                "records": [asdict(r) for r in records]}, tmp)
    tmp.replace(out / "checkpoint.pt")  # atomic: a crash leaves the previous checkpoint intact


def summarize(records: list[StepRecord]) -> dict:
    if not records:
        return {}
    n = len(records)
    mean = lambda k: sum(getattr(r, k) for r in records) / n  # noqa: E731
    up, down = mean("bytes_up"), mean("bytes_down")
    pay = mean("payload_up") + mean("payload_down")
    return {"steps": n, "first_loss": records[0].loss, "last_loss": records[-1].loss,
            "mean_loss_last10": sum(r.loss for r in records[-10:]) / min(10, n),
            "bytes_up_per_step": up, "bytes_down_per_step": down, "wire_over_payload": (up + down) / pay if pay else None,
            "edge_seconds_per_step": mean("edge_seconds"), "cloud_seconds_per_step": mean("cloud_seconds"),
            "step_seconds": mean("step_seconds")}


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
