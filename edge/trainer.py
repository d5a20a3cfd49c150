"""The edge client: private data, the edge segments, every LoRA weight, and an ordinary PyTorch training loop.

    bottom (embedding + k blocks, local LoRA)  ->  RemoteCloud (cloud blocks over gRPC)  ->  top (m blocks, norm,
    LM head, loss)

Modes (`lora.cloud`, --cloud-lora): "none" — the cloud blocks are frozen and carry no LoRA (split training);
"edge" — DLoRA: the cloud blocks carry LoRA too, computed and trained here on the edge from the LoRA inputs the
cloud sends; "carried" — the cloud blocks carry LoRA whose weights (and optimizer) live here, sent with each step;
the cloud applies them and returns their gradients.
The loop itself is model/training.py's `fit` and `evaluate`; the cloud link retries a failed remote step itself.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import tasks as T
from edge import runs
from edge.config import EdgeConfig
from edge.data import check_data, load_items
from edge.link import CloudLink, StepFailed
from edge.methods import carried_method, check_task_defences, check_method, check_step_tokens, trained_blocks, tuner_set
from edge.records import (StepRecord, board_eval, board_step, open_board, run_summary, step_record, summarize,
                          traffic_postfix)
from edge.remote import RemoteCloud
from model.load import DTYPES, fingerprint, load_model
from model.segments import EdgeBottom, EdgeTop, cut_of, drop_blocks
from model.training import Checkpoint, FitOptions, FitResult, endless_batches, evaluate as evaluate_hidden, fit
from privacy.defences.labels import label_free_loss
from privacy.defences.noise import protect_relative
from privacy.defences.nopeek import nopeek_term
from privacy.defences.template import keep_public, public_positions, template_ids
from privacy.security.files import write_atomic
from protocol.step import PREFIX_TARGET
from protocol.tensors import wire_dtype


class EdgeModel(nn.Module):
    """The edge's whole model: bottom, the cloud stand-in, top. `lora` holds every trainable weight: the --peft
    method's set (model/tuners/: a LoRASet, IA3Set, AdapterSet, PromptSet or PrefixSet)."""

    def __init__(self, model, cfg: EdgeConfig, link: CloudLink | None, tokenizer=None):
        super().__init__()
        cut = cut_of(model, cfg.k, cfg.m)
        self.cut, self.task = cut, T.resolve_task(cfg.data.task, cfg.data.task_file)
        local, remote_blocks = trained_blocks(cfg, cut)
        self.lora = tuner_set(model, cfg, sorted(local + remote_blocks), tokenizer)
        self.lora.to(device=cfg.device, dtype=DTYPES[cfg.dtype])
        self.prompt = self.lora if hasattr(self.lora, "prepend") else None  # an input method: virtual tokens
        self.prefix = self.lora if self.lora.peft_type == "PREFIX_TUNING" else None  # prefix tuning: every layer's
        self.fingerprint = fingerprint(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if hasattr(self.lora, "attach"):
            self.lora.attach(model, local)
        drop_blocks(model, cut.cloud)  # the edge never holds the cloud's weights
        self.bottom, self.top = EdgeBottom(model, cut), EdgeTop(model, cut)
        targets = () if not remote_blocks else (PREFIX_TARGET,) if self.prefix is not None else self.lora.cfg.targets
        self.cloud = RemoteCloud(link, wire_dtype(cfg.wire_up), wire_dtype(cfg.wire_down), self.lora if remote_blocks else None,
                                 remote_blocks, targets, carried=carried_method(cfg) if cfg.lora.cloud == "carried"
                                 else None, label_mask=cfg.noise.label_mask, seed=cfg.optim.seed)
        self.noise_sigma, self.noise_clip = cfg.noise.sigma, cfg.noise.clip
        self.nopeek, self.privacy_term = cfg.noise.nopeek, None  # --noise-nopeek: its weight, and the step's term
        # --noise-label-free: the two label words' token ids, whose logit margin's gradient is what the cloud gets
        self.label_free_ids = T.label_token_ids(self.task, tokenizer) if cfg.noise.label_free else None
        # --noise-template-only: the template's literal prefix and suffix ids, the positions the cloud gets
        self.template = template_ids(self.task.template, tokenizer) if cfg.noise.template_only else None

    def cloud_output(self, batch: T.Batch):
        """(the cloud blocks' output, the attention mask, the step's prefixes): all below the edge's top blocks."""
        h, mask = self.bottom.token_embeds(batch.input_ids), batch.attention_mask
        tokens = h  # the real tokens' input embeddings: what --noise-nopeek decorrelates the sent state from
        if self.prompt is not None:  # prompt, ptuning: the virtual tokens go first (as PEFT puts them before the
            h, mask = self.prompt.prepend(h, mask)  # positions); the cloud sees them too
        prefix = self.prefix.prefixes() if self.prefix is not None else None  # once per step, for every layer
        h = self.bottom(None, mask, token_embeds=h, prefix=prefix)
        if self.nopeek and torch.is_grad_enabled():  # the real tokens are the last T positions, after any virtual
            self.privacy_term = nopeek_term(tokens, h[:, -tokens.shape[1]:], batch.attention_mask, self.nopeek)
        if self.template is not None:  # the text's own rows stay here: zeros, masked out for the cloud and the top
            h, mask = keep_public(h, mask, public_positions(batch.input_ids, batch.attention_mask, *self.template))
        # what leaves the device is clipped, then noised, sigma relative to its RMS (privacy/defences/noise.py)
        h = protect_relative(h, mask, self.noise_clip, self.noise_sigma)
        return self.cloud(h, mask, prefix), mask, prefix

    def hidden(self, batch: T.Batch) -> torch.Tensor:
        return self.top_hidden(*self.cloud_output(batch))

    def top_hidden(self, cloud_out, mask, prefix) -> torch.Tensor:
        h = self.top(cloud_out, mask, prefix)
        return h if self.prompt is None else h[:, self.prompt.num_virtual:]  # the real tokens' positions

    def loss(self, batch: T.Batch):
        """(the training loss, the logits): the task's loss, with --noise-nopeek its privacy term added."""
        self.privacy_term = None  # only this batch's forward sets it (not one of a forward outside a loss)
        loss, logits = self._task_loss(batch)
        if self.privacy_term is not None:
            loss, self.privacy_term = loss + self.privacy_term, None
        return loss, logits

    def _task_loss(self, batch: T.Batch):
        if self.label_free_ids is None:
            return T.loss_from_hidden(self.task, self.hidden(batch), batch, self.top.lm_head)
        cloud_out, mask, prefix = self.cloud_output(batch)
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)

        def label_logits(x):
            return self.top.lm_head(self.top_hidden(x, mask, prefix)[rows, batch.answer_pos])[:, self.label_free_ids]
        loss, self.cloud.grad_scale, free = label_free_loss(cloud_out, label_logits, batch.label)
        to_cloud = (cloud_out * free).sum()  # its gradient into the cloud's output is `free`, the label-free one
        return loss + (to_cloud - to_cloud.detach()), None


@dataclass
class TrainResult:
    metrics: dict  # what out_dir/metrics.json holds: config (no token), evaluations, step records, summary
    model: EdgeModel  # the trained model

    def adapter(self) -> dict[str, torch.Tensor]:
        """The trained LoRA in PEFT format (the state dict of out_dir/adapter)."""
        return self.model.lora.peft_state_dict()


def build_edge(cfg: EdgeConfig, *, loaded=None, link: CloudLink | None = None):
    """Check the data, load the model, cut it, connect and open a session. Returns (edge_model, tokenizer, link)."""
    check_method(cfg)
    task = check_data(cfg)  # data errors before the model loads or a session opens
    check_task_defences(cfg, task)
    torch.manual_seed(cfg.optim.seed)
    loaded = loaded or load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device)
    tokenizer = loaded.tokenizer or T.tiny_tokenizer()
    T.check_tokens(task, tokenizer)  # label words tell apart for this tokenizer: before the session too
    link = link or CloudLink(link_config(cfg))
    em = EdgeModel(loaded.model, cfg, link, tokenizer)
    open_session(em, cfg)
    return em, tokenizer, link


def link_config(cfg: EdgeConfig):
    """The link's settings, with one identity: with TLS and no --client-name, the certificate of --name, if
    <tls-dir> has one (else none is presented: plain TLS)."""
    lc = cfg.link
    if lc.tls_dir and lc.client_name is None and (Path(lc.tls_dir) / f"{cfg.name}.pem").is_file():
        from dataclasses import replace
        lc = replace(lc, client_name=cfg.name)
    return lc


def open_session(em: EdgeModel, cfg: EdgeConfig):
    carried = {}
    if em.cloud.carried == "ia3":
        carried = dict(carried="ia3", feedforward_targets=em.lora.cfg.feedforward)
    elif em.cloud.carried == "prefix":
        carried = dict(carried="prefix", prefix_tokens=em.prefix.num_virtual)
    elif em.cloud.carried:
        carried = dict(carried=em.cloud.carried, lora_rank=em.lora.cfg.r, lora_scaling=em.lora.cfg.scaling)
    elif em.cloud.lora_blocks and getattr(em.lora, "branch_on_output", False):
        carried = dict(branch_on_output=True)  # bottleneck adapters: the cloud sends each site's output
    try:
        return em.cloud.link.open(fingerprint=em.fingerprint, k=cfg.k, m=cfg.m, wire_up=wire_dtype(cfg.wire_up),
                                  wire_down=wire_dtype(cfg.wire_down),
                                  lora_targets=em.lora.cfg.targets if em.cloud.lora_blocks and em.prefix is None
                                  else (), lora_blocks=em.cloud.lora_blocks, **carried)
    except StepFailed as e:
        if em.prefix is not None and "max_prefix_tokens" in str(e):  # the user's flag, not the link's fault
            raise ValueError(f"the cloud refused the session: {e.details}: lower --prefix-tokens") from None
        raise


def evaluate(em: EdgeModel, items: list[dict], pad_id: int, batch_size: int = 32, label_ids=None,
             desc: str | None = None, position: int = 0) -> dict:
    """Classification: accuracy from the label words' logits. LM: perplexity. Runs through the cloud like training
    (with the link's retries), with every LoRA module: Kill & Revive's killed set is put aside meanwhile."""
    killed, em.cloud.killed = em.cloud.killed, set()
    try:
        return evaluate_hidden(em.hidden, em.top.lm_head, em.task, items, pad_id, label_ids, batch_size, desc,
                               position)
    finally:
        em.cloud.killed = killed


def train(cfg: EdgeConfig, *, loaded=None, link: CloudLink | None = None, on_step=None,
          step_hook=None, initial_adapter: dict | None = None, existing: str = "resume") -> TrainResult:
    """Train, evaluate, save. The metrics are also written to out_dir/metrics.json, next to the adapter (PEFT
    format), the run's config.json and the checkpoint a crashed run resumes from.

    `on_step(record)` sees every StepRecord (live printing); `step_hook(em, step)` runs before each step;
    `initial_adapter` (PEFT-format state dict) starts from given LoRA weights (a federated round's global adapter;
    `cfg.init_adapter` names a PEFT folder instead). `existing` says what to do with a run already in out_dir
    (edge/runs.py): "resume" it if its settings match (else RunError naming those that differ), "refuse", or
    "overwrite" it.
    """
    if initial_adapter is not None and cfg.init_adapter:
        raise ValueError("give initial_adapter or cfg.init_adapter, not both")
    resuming = runs.prepare(cfg, existing)  # before the model loads: a refused folder costs nothing
    em, tok, link = build_edge(cfg, loaded=loaded, link=link)
    try:
        if cfg.out_dir and not resuming:
            runs.write_config(cfg)
        metrics = _train_and_evaluate(em, tok, cfg, on_step, step_hook, initial_adapter, resuming)
    except BaseException:
        link.close()
        raise
    stats = link.close()
    if stats is not None:
        metrics["cloud_session"] = {"steps": stats.steps, "bytes_received": stats.bytes_received,
                                    "bytes_sent": stats.bytes_sent}
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        em.lora.save_peft(out / "adapter", cfg.model)
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=1).encode(), 0o600)  # a private run's record
    return TrainResult(metrics, em)


def _train_and_evaluate(em: EdgeModel, tok, cfg: EdgeConfig, on_step, step_hook, initial_adapter,
                        resuming: bool = False) -> dict:
    task, pad_id = em.task, tok.pad_token_id if tok.pad_token_id is not None else 0
    label_ids = T.label_token_ids(task, tok) if task.kind == "classify" else None
    if initial_adapter is not None:
        em.lora.load_peft_state_dict(initial_adapter)
    elif cfg.init_adapter:
        runs.load_adapter(em.lora, cfg.init_adapter)  # it must fit exactly; the error says what differs
    if cfg.lora.freeze_a:
        for name, p in em.lora.named_parameters():
            p.requires_grad_("lora_A" not in name)
    train_items = load_items(cfg, tok, "train")
    dev_items = load_items(cfg, tok, "dev") if (cfg.eval.before or cfg.eval.after) else []
    check_step_tokens(em, cfg, train_items, dev_items)  # before the first step: a step the cloud would refuse
    checkpoint = Checkpoint(cfg.out_dir) if cfg.out_dir else None
    metrics = {"config": cfg.public(), "cut": {"k": cfg.k, "m": cfg.m, "cloud_blocks": list(em.cut.cloud)},
               "trainable_parameters": sum(p.numel() for p in em.lora.parameters())}

    def score(when: str) -> dict:
        return evaluate(em, dev_items, pad_id, cfg.eval.batch_size, label_ids,
                        f"{cfg.name} dev ({when})" if cfg.progress else None, cfg.progress_row)

    board = open_board(cfg.tensorboard)
    try:
        if cfg.eval.before and not (checkpoint and checkpoint.exists()):
            metrics["eval_before"] = score("before")
            if cfg.out_dir:  # kept for a resumed run (one that crashes after this) to report
                write_atomic(Path(cfg.out_dir) / "metrics.json", json.dumps(metrics, indent=1).encode(), 0o600)
        elif cfg.eval.before and resuming and "eval_before" in (saved := runs.saved_metrics(cfg)):
            metrics["eval_before"] = saved["eval_before"]  # the resumed run measured it before it stopped
        board_eval(board, metrics.get("eval_before"), 0)
        records = _fit(em, cfg, train_items, pad_id, checkpoint, on_step, step_hook, board).records
        em.eval()
        if cfg.eval.after:
            metrics["eval_after"] = score("after")
            board_eval(board, metrics["eval_after"], cfg.optim.steps)
    finally:
        if board is not None:
            board.close()
    metrics["steps"] = records
    metrics["summary"] = run_summary(records, em.cloud.lora_blocks)
    return metrics


def _fit(em: EdgeModel, cfg: EdgeConfig, items: list[dict], pad_id: int, checkpoint: Checkpoint | None,
         on_step, step_hook, board=None) -> FitResult:
    """The steps, through model.training.fit; resumes from `checkpoint` at the same batch when it exists."""
    kr = None
    if cfg.kr.enabled and em.cloud.lora_blocks:
        from edge.killrevive import KillRevive
        kr = KillRevive(em.cloud.lora_blocks, cfg.kr)
    result = FitResult()
    finished: list = []  # the traffic of this step's micro-batches done so far (gradient accumulation)
    started = [False]  # a micro-batch of this step has run

    def before_step(step: int) -> None:
        if kr:
            kr.before_step(em, step, result.losses[-1] if result.losses else None)
        if step_hook:
            step_hook(em, step)
        em.cloud.step = step
        finished.clear()
        started[0] = False

    def loss_of(batch):
        if started[0]:  # the previous micro-batch of this step is done, its backward included
            finished.append(em.cloud.last_traffic)
        started[0] = True
        return em.loss(batch)[0]

    def after_step(step: int, loss: float, seconds: float) -> dict:
        rec = step_record(step, loss, seconds, [*finished, em.cloud.last_traffic], em.cloud.active_blocks())
        if on_step:
            on_step(rec)
        board_step(board, step, loss, result.lrs[-1], rec)
        return asdict(rec)

    o = cfg.optim
    batches = (b.to(cfg.device) for b in endless_batches(em.task, items, o.batch_size, pad_id, o.seed))
    opts = FitOptions(steps=o.steps, lr=o.lr, checkpoint_every=o.checkpoint_every,
                      progress=f"{cfg.name} train" if cfg.progress else None, progress_row=cfg.progress_row,
                      postfix=traffic_postfix, warmup_steps=o.warmup_steps, schedule=o.schedule,
                      max_grad_norm=o.max_grad_norm, grad_accum_steps=o.grad_accum_steps)
    def load_state(weights: dict) -> None:
        try:
            em.lora.load_state_dict(weights)
        except RuntimeError as e:  # other targets, rank or blocks than this run's: one line, not a traceback
            raise runs.RunError(f"{checkpoint.path} holds other LoRA weights than this run's "
                                f"({str(e).splitlines()[0]}): pass --overwrite to start again, or choose another "
                                "--out-dir") from None

    em.train()
    return fit(loss_of, [p for p in em.lora.parameters() if p.requires_grad], batches, opts,
               state=em.lora.state_dict, load_state=load_state, checkpoint=checkpoint,
               before_step=before_step, after_step=after_step, result=result)


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


__all__ = ["EdgeConfig", "EdgeModel", "StepRecord", "TrainResult", "build_edge", "open_session", "evaluate", "train",
           "summarize"]
