"""Using a tuned adapter without training it: score it on a dev set, or generate text with it.

    through the cloud   the edge's model as in training (bottom, RemoteCloud, top; edge/trainer.py's EdgeModel):
                        every forward pass is one forward-only cloud step, with the link's retries
    locally (local)     the whole model on this machine (for whoever holds it), the LoRA hooked onto the blocks it
                        adapts: no cloud, no wire

`open_model(cfg, adapter)` gives either as a `Tuned` (hidden states, LM head, task, tokenizer); `score` evaluates
it as training does (model/training.py's `evaluate`, so the same adapter gets the same accuracy);
`generate` samples from it one token per forward pass (no KV cache crosses the wire: each token is one cloud step
over the whole sequence so far), greedy at temperature 0. `tandem edge eval` / `tandem edge generate`
(cli/edge_commands.py) are these on the command line.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

import tasks as T
from edge import runs
from edge.config import EdgeConfig
from model.load import DTYPES, load_model


@dataclass
class SampleOptions:
    max_new_tokens: int = 64  # tokens to generate at most (fewer when the model ends the text)
    temperature: float = 0.0  # sampling temperature; 0: greedy, the most likely token every time
    top_k: int = 0  # sample among the k most likely tokens only (0: all)
    top_p: float = 1.0  # ... and among the most likely tokens whose probabilities add up to p only (1: all)
    seed: int = 0  # random seed of the sampling: the same seed, prompt and adapter give the same text


@dataclass
class Tuned:
    """A model with an adapter, ready to run forward passes (`hidden`), through the cloud or locally."""
    hidden: Callable[[T.Batch], torch.Tensor]  # batch -> final hidden state [B, T, H] (after the final norm)
    lm_head: torch.nn.Module
    task: T.Task
    tokenizer: object
    cfg: EdgeConfig
    where: str  # "through <address>" or "locally"
    em: object = None  # the EdgeModel (through the cloud), else None
    max_positions: int | None = None
    close: Callable[[], object] = field(default=lambda: None)

    def traffic(self):
        """The last forward's wire traffic (protocol.step.Traffic), or None locally."""
        return self.em.cloud.last_traffic if self.em is not None else None


def _task(cfg: EdgeConfig) -> T.Task:
    resolve = getattr(T, "resolve_task", None)
    return resolve(cfg.data.task, cfg.data.task_file) if resolve else T.TASKS[cfg.data.task]


def _blocks_of(model) -> int:
    from model.segments import family_of
    return len(family_of(model).blocks(model))


def _max_positions(model) -> int | None:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def fit_cloud_lora(cfg: EdgeConfig, adapter: str | None, n_blocks: int) -> EdgeConfig:
    """--cloud-lora as the adapter needs it: "edge" (DLoRA) when it has LoRA on a block the cloud runs."""
    blocks = runs.adapter_blocks(adapter) if adapter else None
    if blocks is None:
        return cfg
    local = set(range(cfg.k)) | set(range(n_blocks - cfg.m, n_blocks))
    return replace(cfg, lora=replace(cfg.lora, cloud="none" if set(blocks) <= local else "edge"))


def open_model(cfg: EdgeConfig, adapter: str | None, *, local: bool = False, loaded=None, link=None,
               infer_cloud_lora: bool = False) -> Tuned:
    """The model `cfg` describes with the PEFT adapter in `adapter` (None: the base model), through the cloud
    (a session is opened; `close()` ends it) or `local`ly. `infer_cloud_lora`: pick --cloud-lora from the
    adapter's blocks (when no run config said)."""
    loaded = loaded or load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device)
    tok = loaded.tokenizer or T.tiny_tokenizer()
    n_blocks = _blocks_of(loaded.model)
    if infer_cloud_lora:
        cfg = fit_cloud_lora(cfg, adapter, n_blocks)
    if local:
        return _open_local(cfg, adapter, loaded, tok, n_blocks)
    from edge.link import CloudLink
    from edge.trainer import EdgeModel, link_config, open_session
    torch.manual_seed(cfg.optim.seed)  # the LoRA's initial values, replaced by the adapter's
    link = link or CloudLink(link_config(cfg))
    try:
        em = EdgeModel(loaded.model, cfg, link)
        if adapter:  # without one, the LoRA is as initialised: B = 0, the base model exactly
            runs.load_adapter(em.lora, adapter)
        open_session(em, cfg)
    except BaseException:
        link.close()
        raise
    em.eval()
    return Tuned(em.hidden, em.top.lm_head, em.task, tok, cfg, f"through {cfg.link.address}", em,
                 _max_positions(loaded.model), link.close)


def _open_local(cfg: EdgeConfig, adapter: str | None, loaded, tok, n_blocks: int) -> Tuned:
    from model.tuners.lora import LoRAConfig, LoRASet
    if cfg.peft.method != "lora":
        raise ValueError(f"--local runs LoRA adapters only: run the --peft {cfg.peft.method} adapter through the cloud "
                         "(without --local)")
    from model.segments import BlockRun, family_of
    model = loaded.model
    family = family_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter:
        blocks = runs.adapter_blocks(adapter)
        if blocks is None:  # the blocks the edge would have trained
            local = set(range(cfg.k)) | set(range(n_blocks - cfg.m, n_blocks))
            blocks = sorted(set(range(n_blocks)) if cfg.lora.cloud != "none" else local)
        lo = cfg.lora
        lora = LoRASet(model, LoRAConfig(lo.r, lo.alpha, 0.0, tuple(lo.targets), list(blocks)))
        lora.to(device=cfg.device, dtype=DTYPES[cfg.dtype])
        runs.load_adapter(lora, adapter)
        lora.attach(model, blocks)
    run, norm = BlockRun(model, range(n_blocks)), family.final_norm(model)

    def hidden(batch: T.Batch) -> torch.Tensor:
        return norm(run(family.embed(model, batch.input_ids), batch.attention_mask))

    model.eval()
    return Tuned(hidden, model.get_output_embeddings(), _task(cfg), tok, cfg, "locally", None,
                 _max_positions(model))


def score(tuned: Tuned, progress: bool = False) -> dict:
    """The dev score of the first cfg.eval.examples dev examples, exactly as training's evaluation computes it."""
    from edge.data import load_items
    from model.training import evaluate
    cfg, tok = tuned.cfg, tuned.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    label_ids = T.label_token_ids(tuned.task, tok) if tuned.task.kind == "classify" else None
    items = load_items(cfg, tok, "dev")
    return evaluate(tuned.hidden, tuned.lm_head, tuned.task, items, pad_id, label_ids, cfg.eval.batch_size,
                    f"{cfg.name} dev" if progress else None, cfg.progress_row)


def next_token(logits: torch.Tensor, opts: SampleOptions, generator: torch.Generator | None = None) -> int:
    """One token from next-token logits [V]: argmax at temperature 0, else sampled after temperature, top-k and
    top-p (nucleus) filtering."""
    logits = logits.detach().float().cpu()
    if opts.temperature <= 0:
        return int(logits.argmax())
    logits = logits / opts.temperature
    if 0 < opts.top_k < logits.numel():
        kth = torch.topk(logits, opts.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < opts.top_p < 1:
        ordered, index = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, -1)
        drop = probs.cumsum(-1) - probs > opts.top_p  # keep the smallest head whose mass reaches top_p
        logits = torch.full_like(logits, float("-inf")).scatter(0, index, ordered.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


def check_sampling(opts: SampleOptions) -> None:
    if opts.max_new_tokens < 1 or opts.temperature < 0 or opts.top_k < 0 or not 0 < opts.top_p <= 1:
        raise ValueError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")


@torch.no_grad()
def generate(tuned: Tuned, prompt_ids: list[int], opts: SampleOptions, eos_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> dict:
    """Continue `prompt_ids`; returns {"ids": new token ids, "steps": forward passes, "bytes_up", "bytes_down"}.
    Through the cloud every forward pass is one forward-only step (torch.no_grad: nothing is kept for a backward)."""
    check_sampling(opts)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    gen = torch.Generator().manual_seed(opts.seed)
    device = tuned.cfg.device
    ids, new, up, down, steps = list(prompt_ids), [], 0, 0, 0
    for _ in range(opts.max_new_tokens):
        if tuned.max_positions is not None and len(ids) >= tuned.max_positions:
            break
        x = torch.tensor([ids], device=device)
        h = tuned.hidden(T.Batch(x, torch.ones_like(x)))
        steps += 1
        tr = tuned.traffic()
        if tr is not None:
            up, down = up + tr.bytes_up, down + tr.bytes_down
        token = next_token(tuned.lm_head(h[:, -1])[0], opts, gen)
        if eos_id is not None and token == eos_id:
            break
        ids.append(token)
        new.append(token)
        if on_token is not None:
            on_token(token)
    return {"ids": new, "steps": steps, "bytes_up": up, "bytes_down": down}


__all__ = ["SampleOptions", "Tuned", "open_model", "score", "generate", "next_token", "fit_cloud_lora"]
