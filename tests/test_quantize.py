"""`tandem cloud serve --quantize int8|int4`: a cloud holding its blocks in 8 or 4 bits trains exactly as local PEFT
on the same quantized base, takes a fraction of the fp32 weight memory, and still matches an fp32 edge."""
from __future__ import annotations

import copy

import pytest
import torch

import tasks as T
from cli.main import main
from cloud.quantize import dense_weight, quantize_blocks, quantized_linear, weight_bytes
from cloud.serve import Cloud, ServeConfig
from model.load import fingerprint, load_model
from model.segments import family_of
from tests.conftest import TOKENS, make_edge, randomize_lora_b, sst2_batches, train_edge_steps
from tests.reference import peft_local as ref

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, LR = 20, 1e-2


def quantized_cloud(tiny, mode: str) -> Cloud:
    return Cloud(ServeConfig(model="tiny-llama", port=0, quantize=mode), model=copy.deepcopy(tiny.model),
                 tokens={v: k for k, v in TOKENS.items()})


@pytest.mark.parametrize("mode, cloud_lora", [("int8", "none"), ("int8", "carried"), ("int8", "carried-dora"),
                                              ("int4", "none"), ("int4", "carried"), ("int4", "carried-dora")])
def test_twenty_steps_match_local_peft_on_the_same_quantized_base(tiny, mode, cloud_lora):
    """Split (LoRA on the edge's blocks), carried (LoRA on the quantized cloud blocks too) and carried DoRA (whose
    norm reads the de-quantized weight) through a quantized cloud, against PEFT on the full model whose cloud blocks
    are quantized the same way."""
    cloud = quantized_cloud(tiny, mode)
    try:
        assert cloud.service.fingerprint == fingerprint(tiny.model)  # an fp32 edge opens a session below
        dora = cloud_lora == "carried-dora"
        em, _, link = make_edge(cloud, tiny, cloud_lora=cloud_lora.removesuffix("-dora"), lora_dora=dora)
        randomize_lora_b(em.lora)
        base = copy.deepcopy(tiny.model)
        quantize_blocks(base, mode, em.cut.cloud)
        pm = ref.peft_model(base, em.lora)
        fp32 = ref.peft_model(copy.deepcopy(tiny.model), em.lora)
        batches = sst2_batches(STEPS)
        with torch.no_grad():
            fp32_first = T.loss_from_hidden(T.TASKS["sst2"], ref.hidden(fp32, batches[0]), batches[0],
                                            fp32.base_model.model.get_output_embeddings())[0].item()
        ref_losses, _ = ref.train_steps(pm, T.TASKS["sst2"], batches, LR)
        split_losses = train_edge_steps(em, batches, LR)
        link.close()
    finally:
        cloud.stop(0)
    rel = [abs(a - b) / abs(b) for a, b in zip(split_losses, ref_losses)]
    assert max(rel) <= 1e-4, rel
    assert split_losses[-1] < split_losses[0]
    assert abs(split_losses[0] - fp32_first) / fp32_first > 1e-4  # the quantization is really there


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_forward_without_gradient_leaves_the_backward_as_it_was(tiny, mode):
    """Evaluation (no gradient) between training steps leaves the training path as it was."""
    model = copy.deepcopy(tiny.model).eval()
    quantize_blocks(model, mode)
    model.eval()
    h = model.model.embed_tokens(torch.randint(3, 300, (2, 12))).detach()

    def out_and_grad():
        x = h.clone().requires_grad_(True)
        out = model(inputs_embeds=x).logits
        out.square().mean().backward()
        return out.detach(), x.grad

    before = out_and_grad()
    with torch.no_grad():
        model(inputs_embeds=h)
    after = out_and_grad()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def smollm2_shaped(blocks: int = 2):
    """Random blocks of SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 heads, 3 key-value heads): the fraction of the
    fp32 bytes depends on the shapes (per-row and per-block scales), and the tiny model's are too small to tell."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=576, intermediate_size=1536, num_hidden_layers=blocks,
                                        num_attention_heads=9, num_key_value_heads=3)).eval()


@pytest.mark.parametrize("mode, budget, error", [("int8", 0.3, 0.01), ("int4", 0.2, 0.09)])
def test_served_blocks_take_a_fraction_of_the_fp32_weight_memory(mode, budget, error):
    model = smollm2_shaped()
    blocks = family_of(model).blocks(model)
    fp32 = sum(t.numel() * 4 for t in blocks.parameters())
    linears = [m for m in blocks.modules() if type(m) is torch.nn.Linear]
    weights = [m.weight.detach().clone() for m in linears]
    report = quantize_blocks(model, mode)
    assert report.before == fp32 and report.after == weight_bytes(blocks) and report.ratio <= budget, report
    assert report.linears == 7 * len(blocks) == len(linears) and report.rss > 0
    quantized = [m for m in blocks.modules() if type(m).__name__ == "QLinear"]
    assert len(quantized) == len(linears)
    for linear, w in zip(quantized, weights):  # each weight is held, de-quantized, within its format's error
        assert not linear.weight.requires_grad
        err = (dense_weight(linear) - w).norm() / w.norm()
        assert err < error, (linear, err)


def test_int4_holds_a_gguf_q4_1_weight_exactly():
    """int4's groups are GGUF Q4_1's blocks of 32 (16 levels between each block's min and max): a weight that came
    from a Q4_1 file, as SmolLM2's does, is held without error; in groups of 64 it is not."""
    import gguf
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).numpy() * 0.05
    linear = torch.nn.Linear(96, 64, bias=False)
    linear.weight.data = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q4_1), q4_1).copy())
    for group, exact in ((32, True), (48, False)):
        held = quantized_linear(copy.deepcopy(linear), "int4", group)
        err = (dense_weight(held) - linear.weight).abs().max().item()
        assert (err == 0.0) == exact, (group, err)
    with pytest.raises(ValueError, match=r"^--quantize int4: a linear has 96 input features, not a multiple of the "
                                         r"group of 64; use --quantize int8$"):
        quantized_linear(linear, "int4", 64)


def test_the_cloud_reports_its_memory(tiny):
    cloud = quantized_cloud(tiny, "int4")
    try:
        assert cloud.memory.mode == "int4" and cloud.memory.blocks == 6
        assert cloud.memory.line() in cloud.service.description and "(int4, 0.191 of 0.8 MiB float32)" in cloud.memory.line()
    finally:
        cloud.stop(0)


def test_a_bad_quantize_value_is_one_clear_line(tiny, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cloud", "serve", "--quantize", "int3"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.endswith("argument --quantize: invalid choice: 'int3' (choose from 'none', "
                                               "'int8', 'int4')"), last
    with pytest.raises(ValueError, match=r"^--quantize must be one of none, int8, int4, got 'int3'$"):
        Cloud(ServeConfig(model="tiny-llama", port=0, quantize="int3"), model=tiny.model, tokens={})
    with pytest.raises(ValueError, match=r"^--quantize int8: this gpt2 model's blocks hold no nn.Linear"):
        quantize_blocks(load_model("tiny-gpt2").model, "int8")
