"""The federation's global adapter for each PEFT method: the method's set at the devices' sites (`method_set`, the
same settings as the devices' edge/methods.py `tuner_set`), the round-1 adapter, saving the global one, and the
effective weights the round's deviation compares (strategies/base.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cloud.federation.strategies.base import Effective, as_float64, lora_pairs, lora_products
from model.segments import cut_of
from model.tuners import METHODS, method_set as build_method_set
from protocol.federation import exchanged_state, load_exchanged


def initial_adapter(model, cfg) -> dict[str, np.ndarray]:
    """The round-1 adapter at the sites the devices will train, as a round carries it (protocol/federation.py
    `exchange`), PEFT's init seeded by `seed`: LoRA's A Kaiming-uniform and B zero (DoRA's magnitudes the base
    weights' row norms), (IA)³'s vectors one, prompt tuning's tokens random (or the init text's), P-tuning's and
    prefix tuning's encoder as PEFT builds it (without a projection: the prefix table, random normal)."""
    torch.manual_seed(cfg.seed)
    return {k: v.numpy() for k, v in exchanged_state(method_set(model, cfg), cfg).items()}


def method_set(model, cfg):
    """The `peft` method's set of trainable weights (model/tuners `method_set`, the builder the devices' edge uses) at
    the sites the devices train: a site method (lora, ia3, adapter) at the devices' own blocks, and with DLoRA or
    carried the cloud's too; prefix tuning at every layer (the cloud blocks' prefixes ride each step, carried)."""
    cut = cut_of(model, cfg.cut_bottom, cfg.cut_top)
    blocks = sorted([*cut.bottom, *cut.top] + (list(cut.cloud) if cfg.cloud_lora != "none" else []))
    tokenizer = None
    if METHODS[cfg.peft].kind == "input" and cfg.prompt_init_text:  # the text's ids, as the devices' tokenizer gives
        import tasks as T
        from model.load import load_tokenizer
        tokenizer = load_tokenizer(cfg.model) or T.tiny_tokenizer()
    return build_method_set(model, cfg.peft, blocks, cfg.method_options, tokenizer)


def _tensors(adapter: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in adapter.items()}


def save_adapter(model, cfg, adapter: dict[str, np.ndarray], path: Path) -> Path:
    """The global adapter (a round's form) written in PEFT's format; for P-tuning and prefix tuning with a
    projection the encoder's output (PEFT loads it as a table without the encoder)."""
    tuners = method_set(model, cfg)
    load_exchanged(tuners, _tensors(adapter), cfg)
    return tuners.save_peft(path, cfg.model)


def effective_weights(model, cfg) -> Effective:
    """What the round's deviation compares (strategies/base.py): the effective weights of an adapter. LoRA and
    rsLoRA: B A per site (the constant scaling cancels). DoRA: the change of each adapted weight,
    m (W + s B A) / ||W + s B A|| - W (row norms). (IA)³, prompt tuning: the parameters (the adapted weight l * W is
    linear in l; the tokens are the parameters): their deviation is float rounding. P-tuning: the encoder's output,
    the virtual tokens. Prefix tuning: the prefixes, the encoder's output (without a projection the exchanged table
    itself, as prompt tuning's tokens; with one the MLP's output, in float64). Bottleneck adapters: each site's
    adapter output up(act(down(y))) on a fixed random probe y (16 rows, seeded): what an adapter adds to its site's
    output."""
    if cfg.peft in ("ia3", "prompt"):
        return as_float64
    if cfg.peft == "adapter":
        tuners = method_set(model, cfg)
        g = torch.Generator().manual_seed(0)
        probes = {pos: torch.randn(16, tuners.site(*pos).in_features, generator=g) for pos in tuners.prefixes}

        def outputs(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            tuners.load_peft_state_dict(_tensors(adapter))
            with torch.no_grad():
                return {prefix: tuners.site(*pos)(probes[pos]).double().numpy()
                        for pos, prefix in tuners.prefixes.items()}
        return outputs
    if cfg.peft == "ptuning":
        tuners = method_set(model, cfg)

        def prompts(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            load_exchanged(tuners, _tensors(adapter), cfg)
            with torch.no_grad():
                return {"prompt_embeddings": tuners.prompts()[0].double().numpy()}
        return prompts
    if cfg.peft == "prefix":
        if cfg.exchange == "peft":  # no projection: the exchanged table is the prefixes
            return as_float64
        tuners = method_set(model, cfg).double()  # the encoder's output in float64: only the MLP's deviation shows

        def prefixes(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            load_exchanged(tuners, {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in adapter.items()},
                           cfg)
            with torch.no_grad():
                return {"prompt_embeddings": tuners.flat().numpy()}
        return prefixes
    if not cfg.lora_dora:
        return lora_products
    tuners = method_set(model, cfg)
    blocks = tuners.family.blocks(model)
    bases = {}
    for key, prefix in tuners.prefixes.items():
        b, s = key.split("/")
        lin = tuners.family.site_module(blocks[int(b)], s)
        bases[f"base_model.model.{prefix}"] = tuners.weight(lin).detach().double().numpy()
    scaling = tuners.cfg.scaling

    def dora(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for a_key, b_key in lora_pairs(adapter):
            prefix = a_key[:-len(".lora_A.weight")]
            w = bases[prefix]
            v = w + scaling * adapter[b_key].astype(np.float64) @ adapter[a_key].astype(np.float64)
            m = adapter[f"{prefix}.lora_magnitude_vector"].astype(np.float64)
            out[prefix] = (m / np.linalg.norm(v, axis=1))[:, None] * v - w
        return out
    return dora
