"""Every model family Tandem cuts: the segments reproduce the unsplit model, split and DLoRA training through the
gRPC cloud match local PEFT, LoRA targets name the same modules as PEFT's `target_modules`, and anything else is
refused in one line."""
from __future__ import annotations

import copy
import json
import types
import warnings

import peft
import pytest
import torch

import tasks as T
from model.load import load_model
from model.tuners.lora import LoRAConfig, LoRASet
from model.segments import BlockRun, EdgeBottom, EdgeTop, cut_of, family_of
from model.sites import FAMILY_OF, SITES, site_names, target_names
from tests.conftest import TOKENS, CloudHandle, randomize_lora_b, sst2_batches, train_edge_steps
from tests.reference import peft_local as ref

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"llama": "tiny-llama", "mistral": "tiny-mistral", "qwen2": "tiny-qwen2", "qwen3": "tiny-qwen3",
        "gemma": "tiny-gemma", "phi3": "tiny-phi3", "gpt2": "tiny-gpt2"}  # HF model_type -> tiny random model
SUPPORTED = "Tandem cuts decoder-only models of the families llama, mistral, qwen2, qwen3, gemma, phi3, gpt2"
STEPS, LR = 5, 1e-2


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = load_model(TINY[kind])
            assert cache[kind].model.config.model_type == kind
        return cache[kind]
    return get


def test_every_supported_model_type_has_a_tiny_model():
    assert set(TINY) == set(FAMILY_OF)


@pytest.mark.parametrize("kind", list(TINY))
def test_sites_are_every_linear_of_a_block(models, kind):
    """model/sites.py lists every linear of the family's block (so no PEFT target can reach one Tandem lacks)."""
    model = models(kind).model
    fam = family_of(model)
    block = fam.blocks(model)[0]
    linears = {n for n, m in block.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    assert linears == set(SITES[fam.name])


@pytest.mark.parametrize("kind", list(TINY))
def test_segments_reproduce_the_unsplit_model(models, kind):
    """Embedding (Gemma's sqrt(hidden) scale, GPT-2's positions), masks (Mistral's sliding window, Qwen2's per-layer
    types), blocks and final norm (Gemma's 1 + weight): bottom | cloud | top equals the model's own forward."""
    model = models(kind).model
    cut = cut_of(model, 1, 1)
    ids = torch.randint(3, 300, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        h = EdgeBottom(model, cut)(ids, mask)
        h = EdgeTop(model, cut)(BlockRun(model, cut.cloud)(h, mask), mask)
        expected = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (h - expected)[mask.bool()].abs().max().item() <= 1e-5


# ---- split and DLoRA through the gRPC cloud vs local PEFT ----------------------------------------------------------

def _train(em, batches):
    return train_edge_steps(em, batches, LR)


@pytest.mark.parametrize("cloud_lora", ["none", "edge"])
@pytest.mark.parametrize("kind", list(TINY))
def test_split_and_dlora_match_local_peft(models, kind, cloud_lora, tmp_path):
    """LoRA on every linear of the family's blocks (GPT-2: `c_proj` = attention's and the MLP's), trained through
    the cloud, gives PEFT's losses within 1e-4; in DLoRA every cloud block makes four round trips (input groups)."""
    from edge.trainer import EdgeConfig, build_edge
    from cloud.sessions import CloudConfig
    loaded = models(kind)
    fam = family_of(loaded.model)
    targets = target_names(fam.name)  # gpt2: c_attn, c_proj, c_fc
    handle = CloudHandle(loaded.model, CloudConfig(max_tokens_per_step=4096, step_timeout=5.0))
    try:
        cfg = EdgeConfig.of(cloud=handle.address, token=TOKENS["alice"], model=TINY[kind], progress=False,
                            cloud_lora=cloud_lora, lora_targets=targets)
        em, _, link = build_edge(cfg, loaded=copy.deepcopy(loaded))
        assert set(em.lora.cfg.targets) == set(site_names(fam.name))  # gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj
        randomize_lora_b(em.lora)
        pm = ref.peft_model(copy.deepcopy(loaded.model), em.lora)
        assert _peft_sites(pm) == set(em.lora.prefixes.values())
        batches = sst2_batches(STEPS)
        ref_losses, _ = ref.train_steps(pm, T.TASKS["sst2"], batches, LR)
        losses = _train(em, batches)
        rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
        assert max(rel) <= 1e-4, rel
        if cloud_lora == "edge":
            assert em.cloud.last_traffic.messages_down == 2 + 2 * 4 * len(em.cloud.lora_blocks)
        # what the edge saves is a PEFT adapter of the same modules, loadable onto the full model
        em.lora.save_peft(tmp_path / "adapter", TINY[kind])
        full = peft.PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(tmp_path / "adapter")).eval()
        assert _peft_sites(full) == set(em.lora.prefixes.values())
        link.close()
    finally:
        handle.stop()


# ---- target strings resolve as PEFT resolves them ------------------------------------------------------------------

def _peft_sites(pm) -> set[str]:
    from peft.tuners.lora import LoraLayer
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def _peft_targets(model, targets, **kw):
    """The module names PEFT wraps for `target_modules=targets`, or the ValueError it raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fan = family_of(model).fan_in_fan_out
        try:
            pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=list(targets),
                                                                           fan_in_fan_out=fan, **kw))
        except ValueError as e:
            return e
    return _peft_sites(pm)


def _target_strings(family: str) -> list[tuple[str, ...]]:
    paths = list(SITES[family])
    single = {p.split(".")[-1] for p in paths} | set(paths) | {".".join(p.split(".")[-2:]) for p in paths}
    return [(t,) for t in sorted(single)] + [tuple(target_names(family)), tuple(reversed(paths))]


@pytest.mark.parametrize("kind", list(TINY))
def test_targets_name_the_same_modules_as_peft(models, kind):
    """For each target string (short names, module paths, lists) Tandem's LoRA sites are exactly the modules PEFT's
    own matching wraps: GPT-2's `c_proj` is attn.c_proj and mlp.c_proj in every block."""
    model = models(kind).model
    fam = family_of(model)
    blocks = list(range(len(fam.blocks(model))))
    for targets in _target_strings(fam.name):
        expected = _peft_targets(model, targets)
        assert isinstance(expected, set), (targets, expected)
        lora = LoRASet(model, LoRAConfig(targets=targets, blocks=blocks))
        assert set(lora.prefixes.values()) == expected, targets
        # and the PEFT config Tandem writes (site names, some blocks only) names the same modules again
        some = LoRASet(model, LoRAConfig(targets=targets, blocks=[0, blocks[-1]]))
        assert _peft_sites(peft.get_peft_model(copy.deepcopy(model), some.peft_config())) == set(some.prefixes.values())
    if kind == "gpt2":
        lora = LoRASet(model, LoRAConfig(targets=("c_proj",), blocks=[2]))
        assert set(lora.prefixes.values()) == {"transformer.h.2.attn.c_proj", "transformer.h.2.mlp.c_proj"}


@pytest.mark.parametrize("kind", list(TINY))
def test_targets_that_name_no_linear_are_refused_like_peft(models, kind):
    model = models(kind).model
    fam = family_of(model)
    for bad in ("nonsense", "mlp", "input_layernorm" if fam.name != "gpt2" else "ln_1"):
        assert isinstance(_peft_targets(model, (bad,)), ValueError), bad
        with pytest.raises(ValueError, match=f"no module '{bad}' in a {fam.name} block; {fam.name} targets: "):
            LoRASet(model, LoRAConfig(targets=(bad,), blocks=[0]))


def test_gpt2_wrong_target_names_the_valid_ones(models):
    model = models("gpt2").model
    with pytest.raises(ValueError) as e:
        LoRASet(model, LoRAConfig(targets=("q_proj", "v_proj"), blocks=[0]))
    assert str(e.value).startswith("no module 'q_proj' in a gpt2 block; gpt2 targets: c_attn, c_proj, c_fc")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind, default", [("llama", ("q_proj", "v_proj")), ("qwen3", ("q_proj", "v_proj")),
                                           ("gemma", ("q_proj", "v_proj")), ("phi3", ("qkv_proj",)),
                                           ("gpt2", ("c_attn",))])
def test_default_targets_come_from_the_family(models, kind, default):
    lora = LoRASet(models(kind).model, LoRAConfig(blocks=[0]))
    assert lora.targets == default == family_of(models(kind).model).default_targets()
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    if kind in PEFT_DEFAULTS:  # PEFT's own defaults where it has them (none for phi3: its qkv is fused)
        assert tuple(PEFT_DEFAULTS[kind]) == default


# ---- anything else is refused in one line --------------------------------------------------------------------------

def _fake(model_type: str, **config):
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type, **config))


def test_unsupported_models_are_refused_in_one_line(tmp_path):
    from transformers import BertConfig
    cases = {"falcon": (_fake("falcon"), f"falcon is not supported: {SUPPORTED}"),
             "bert": (types.SimpleNamespace(config=BertConfig()),
                      f"bert is not supported: it is an encoder, and {SUPPORTED}"),
             "t5": (_fake("t5", is_encoder_decoder=True), f"t5 is not supported: it is an encoder, and {SUPPORTED}")}
    for kind, (model, message) in cases.items():
        with pytest.raises(ValueError) as e:
            family_of(model)
        assert str(e.value) == message, kind
    # a model folder is refused before any weight is read
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError) as e:
        load_model(str(folder))
    assert str(e.value) == f"bert is not supported: it is an encoder, and {SUPPORTED}"
