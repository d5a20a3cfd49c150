"""MLP pruning of the emulator (emulator/prune.py, BuildConfig.mlp_keep) on a tiny Llama: the least-squares refit's
known answers, the bundle carrying narrower MLPs through load, tune and plug-in, and the refusals."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import tasks as T
from emulator import prune
from emulator.build import BuildConfig, build, emulator_model, make_layout
from emulator.bundle import load_bundle
from cli.main import main
from emulator.plug import load_adapter, plug
from emulator.tune import TuneConfig, tune
from model.load import load_model
from model.segments import family_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def block_inputs(model, block: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    """The inputs block `block`'s MLP sees on random token batches (post-norm hidden states), [tokens, hidden]."""
    seen = []
    mlp = family_of(model).blocks(model)[block].mlp
    h = mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            model(torch.randint(3, 300, (4, 16), generator=g))
    h.remove()
    return torch.cat(seen)


def gram_of(mlp, x: torch.Tensor) -> torch.Tensor:
    a = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).double()  # the MLP's hidden activations
    return a.T @ a


def test_grams_are_those_of_the_real_tokens_activations():
    """activation_grams reads the activations the model's own forward makes, over real tokens only (padding left
    out): equal to A^T A recomputed from the MLP's inputs at the unmasked positions."""
    from types import SimpleNamespace
    model = load_model("tiny-llama").model
    block = family_of(model).blocks(model)[2]
    mlp = block.mlp
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    seen = []
    h = mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    grams = prune.activation_grams(model, [block], [SimpleNamespace(input_ids=ids, attention_mask=mask)])
    h.remove()
    assert list(grams) == [0]
    assert torch.allclose(grams[0], gram_of(mlp, seen[0][mask.bool()]), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(grams[0], gram_of(mlp, seen[0].reshape(-1, seen[0].shape[-1])), rtol=1e-3)


def test_refit_of_every_neuron_gives_back_the_mlp(tiny):
    """keep = 1: the least-squares down projection of all neurons is the original one (up to the small ridge)."""
    model = load_model("tiny-llama").model
    block = family_of(model).blocks(model)[2]
    x = block_inputs(model, 2)
    with torch.no_grad():
        before = block.mlp(x)
        width = prune.prune_mlp(block, gram_of(block.mlp, x), keep=1.0)
        after = block.mlp(x)
    assert width == block.mlp.up_proj.weight.shape[0] == tiny.model.config.intermediate_size
    assert (after - before).norm() / before.norm() < 1e-3


def test_dead_neurons_go_first_and_pruning_them_is_exact():
    """Neurons whose down column is zero put no energy into the output: keep = 0.5 drops exactly those, and the
    pruned MLP gives the same output (exactly without the refit, up to its ridge with it)."""
    model = load_model("tiny-llama").model
    blocks = family_of(model).blocks(model)
    x = block_inputs(model, 3)
    width = blocks[3].mlp.down_proj.weight.shape[1]
    dead = torch.randperm(width, generator=torch.Generator().manual_seed(1))[: width // 2]
    with torch.no_grad():
        blocks[3].mlp.down_proj.weight[:, dead] = 0
        before = blocks[3].mlp(x)
    gram = gram_of(blocks[3].mlp, x)
    alive = sorted(set(range(width)) - set(dead.tolist()))
    assert prune.choose_neurons(gram, blocks[3].mlp.down_proj.weight, 0.5).tolist() == alive
    for refit in (False, True):
        block = copy.deepcopy(blocks[3])
        with torch.no_grad():
            prune.prune_mlp(block, gram, 0.5, refit=refit)
            assert (block.mlp(x) - before).norm() / before.norm() < (1e-3 if refit else 1e-6)  # refit: the ridge


def test_refit_is_closer_than_plain_selection_on_its_data():
    """Least squares: on the inputs it was fit on, the refit down projection is at least as close to the whole MLP's
    output as the kept neurons' original columns."""
    model = load_model("tiny-llama").model
    block = family_of(model).blocks(model)[2]
    fit = held = block_inputs(model, 2, n=8, seed=0)
    with torch.no_grad():
        want = block.mlp(held)
    gram = gram_of(block.mlp, fit)
    errors = {}
    for refit in (False, True):
        pruned = copy.deepcopy(block)
        with torch.no_grad():
            prune.prune_mlp(pruned, gram, 0.25, refit=refit)
            errors[refit] = ((pruned.mlp(held) - want).norm() / want.norm()).item()
    assert errors[True] < errors[False]


def test_pruned_bundle_loads_tunes_and_plugs(tiny, tmp_path):
    """A bundle built with mlp_keep = 0.5 stores the emulator blocks' MLPs at half width (the adapter blocks whole);
    the loaded model is the one the cloud measured, and the adapter tuned on it plugs into the full model."""
    cfg = BuildConfig(model="tiny-llama", drop=0.0, mlp_keep=0.5, mlp_batches=4, progress=False, quality_task="")
    manifest = build(cfg, tmp_path / "bundle", loaded=tiny)
    assert manifest["mlp_pruning"]["widths"] == {"2": 64, "3": 64} and manifest["mlp_pruning"]["tokens"] > 0
    assert manifest["parameters"]["bundle"] == manifest["parameters"]["full"] - 2 * 3 * 64 * 64
    emulated = load_bundle(tmp_path / "bundle")
    blocks = family_of(emulated.model).blocks(emulated.model)
    assert [b.mlp.up_proj.weight.shape[0] for b in blocks] == [128, 128, 64, 64, 128, 128]
    layout = make_layout(6, 2, 2, 0.0)
    again, _ = emulator_model(tiny.model, layout, T.tiny_tokenizer(), replace(cfg))
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():  # the data owner's model is the one the cloud built (the pruning is deterministic)
        assert torch.equal(emulated.model(ids).logits, again(ids).logits)
        assert not torch.allclose(emulated.model(ids).logits, tiny.model(ids).logits, atol=1e-3)  # it is lossy
    rows = "".join(f"this film is {'wonderful' if i % 2 else 'dreadful'} {i}\t{i % 2}\n" for i in range(40))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    tcfg = TuneConfig(steps=3, batch_size=4, eval_examples=8, train_file=str(tmp_path / "train.tsv"),
                      dev_file=str(tmp_path / "train.tsv"), progress=False)
    tune(tcfg, tmp_path / "bundle", tmp_path / "adapter", emulated=emulated)
    plugged = plug(tiny.model, load_adapter(tmp_path / "adapter"), manifest)
    with torch.no_grad():
        assert not torch.allclose(plugged(ids).logits, tiny.model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("flags, fix", [(["--mlp-keep", "0"], "--mlp-keep must be in"),
                                        (["--mlp-keep", "1.5"], "--mlp-keep must be in"),
                                        (["--mlp-keep", "0.5", "--mlp-batches", "0"], "--mlp-batches must be")])
def test_build_refuses_a_bad_mlp_keep_in_one_line(flags, fix, tmp_path, capsys):
    """Found before any model loads: the model named does not even exist."""
    with pytest.raises(SystemExit) as e:
        main(["offsite", "build", "--model", "no-such-model", "--out", str(tmp_path / "b"), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and fix in err and "\n" not in err


def test_pruning_refuses_an_mlp_without_gates():
    with pytest.raises(ValueError, match="--mlp-keep 1.0"):
        prune.gated_mlp(torch.nn.Module())
