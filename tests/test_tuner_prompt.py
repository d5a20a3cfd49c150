"""Prompt tuning and P-tuning (model/tuners/prompt.py): virtual tokens trained on the edge in front of the input.

Through the gRPC cloud they train as PEFT's own implementation does on the full model; the adapter they save is
PEFT's and loads with `PeftModel.from_pretrained`; the cloud sees V more tokens per sequence and nothing else; and
the options that cannot work are refused before any step, in one line.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import tasks as T
from model.tuners.prompt import PromptConfig, PromptSet
from tests.cli_helpers import refused, train_args
from tests.conftest import CloudHandle, assert_peft_reproduces_edge, make_edge, sst2_batches, train_edge_steps
from tests.reference import peft_local as ref

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LR, V = 20, 1e-2, 6
H = 64  # tiny-llama's hidden size
METHODS = ["prompt", "ptuning"]


def peft_reference(model, ps: PromptSet):
    """PEFT's own model of the set's config on a copy of the full model, with the set's initial weights: the prompt
    embedding table, or the whole prompt encoder (PEFT's saved form holds only its output)."""
    pm = peft.get_peft_model(copy.deepcopy(model), ps.peft_config())
    pm.prompt_encoder["default"].load_state_dict(ps.encoder.state_dict())
    return pm


def peft_hidden(pm, batch: T.Batch) -> torch.Tensor:
    """The final hidden state of PEFT's own forward (it prepends the prompts), at the real tokens' positions."""
    out = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    assert out.logits.shape[1] == V + batch.input_ids.shape[1]  # PEFT's output has the V virtual positions first
    return out.hidden_states[-1][:, V:]


def train_peft(pm, batches) -> list[float]:
    return ref.train_steps(pm, T.TASKS["sst2"], batches, LR, hidden_of=peft_hidden)[0]


# ---------------------------------------------------------------------------------------------- the set vs PEFT

@pytest.mark.parametrize("method", METHODS)
def test_the_set_is_peft_s_own(tiny, method):
    """Same modules, same prompts and the same logits as PEFT's model of the set's config; the saved form is what
    get_peft_model_state_dict returns; hidden state 0 of PEFT's forward is exactly `prepend`'s output."""
    torch.manual_seed(3)
    ps = PromptSet(tiny.model, PromptConfig(method, V))
    assert ps.num_virtual == V
    pm = peft_reference(tiny.model, ps).eval()
    assert type(pm.prompt_encoder["default"]) is type(ps.encoder)
    ours, theirs = ps.peft_state_dict(), peft.get_peft_model_state_dict(pm)
    assert set(ours) == set(theirs) == {"prompt_embeddings"} and ours["prompt_embeddings"].shape == (V, H)
    assert torch.equal(ours["prompt_embeddings"], theirs["prompt_embeddings"])
    b = sst2_batches(1)[0]
    embeds = ps.family.embed(tiny.model, b.input_ids)
    e, mask = ps.prepend(embeds, b.attention_mask)
    assert e.shape == (len(b), V + b.input_ids.shape[1], H) and e.dtype == embeds.dtype
    assert (mask[:, :V] == 1).all() and torch.equal(mask[:, V:], b.attention_mask)
    with torch.no_grad():
        out = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        assert torch.equal(out.hidden_states[0], e)
        mine = tiny.model(inputs_embeds=e, attention_mask=mask).logits
    assert (mine - out.logits).abs().max().item() <= 1e-5
    # bf16 embeddings keep their dtype
    assert ps.prepend(embeds.bfloat16(), b.attention_mask)[0].dtype == torch.bfloat16


def test_text_init_is_peft_s_text_init(tiny, monkeypatch):
    """--prompt-init-text: the text's token embeddings, cut or repeated to V, exactly as PEFT's TEXT init (PEFT
    loads the tokenizer by name; here it is given the same tokenizer)."""
    import transformers
    tok = T.tiny_tokenizer()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    for text in ("Sentiment:", "Is this review positive or negative?"):  # 10 chars repeated, 36 cut
        ps = PromptSet(tiny.model, PromptConfig("prompt", V, init_text=text), tok)
        cfg = ps.peft_config("tiny-llama")
        assert cfg.prompt_tuning_init == "TEXT" and cfg.prompt_tuning_init_text == text
        pm = peft.get_peft_model(copy.deepcopy(tiny.model), cfg)
        table = pm.prompt_encoder["default"].embedding.weight
        assert torch.equal(ps.encoder.embedding.weight, table)
        ids = (tok(text)["input_ids"] * V)[:V]
        assert torch.equal(table, tiny.model.model.embed_tokens.weight[ids])


def test_bad_configs_fail_in_one_line(tiny):
    for cfg, flag in [(PromptConfig("prompt", 0), "--prompt-tokens"), (PromptConfig("ptuning", -2), "--prompt-tokens"),
                      (PromptConfig("ptuning", 4, init_text="hi"), "--prompt-init-text"),
                      (PromptConfig("prompt", 4, encoder_hidden=8), "--ptuning-hidden"),
                      (PromptConfig("ptuning", 4, encoder_hidden=0), "--ptuning-hidden")]:
        with pytest.raises(ValueError, match=flag) as e:
            PromptSet(tiny.model, cfg)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="tokenizer"):
        PromptSet(tiny.model, PromptConfig("prompt", 4, init_text="hi"))


def test_ptuning_hidden_size_and_peft_load_form(tiny, tmp_path):
    """--ptuning-hidden sets PEFT's encoder_hidden_size; loading PEFT's saved form gives PEFT's inference encoder
    (a table, no MLP) with the same prompts; a wrong --prompt-tokens is refused by shape."""
    ps = PromptSet(tiny.model, PromptConfig("ptuning", V, encoder_hidden=16))
    assert ps.encoder.mlp_head[0].out_features == 16 and ps.peft_config().encoder_hidden_size == 16
    ps.save_peft(tmp_path / "a")
    again = PromptSet(tiny.model, PromptConfig("ptuning", V, encoder_hidden=16))
    again.load_peft(tmp_path / "a")
    assert again.inference and not hasattr(again.encoder, "mlp_head")
    assert torch.equal(again.peft_state_dict()["prompt_embeddings"], ps.peft_state_dict()["prompt_embeddings"])
    with pytest.raises(ValueError, match="--prompt-tokens"):
        PromptSet(tiny.model, PromptConfig("ptuning", V + 1)).load_peft(tmp_path / "a")


# ------------------------------------------------------------------------------------ through the gRPC cloud

@pytest.mark.parametrize("method", METHODS)
def test_twenty_steps_match_peft_and_the_adapter_loads_in_peft(cloud, tiny, tmp_path, method):
    em, _, link = make_edge(cloud, tiny, peft=method, prompt_tokens=V)
    ps = em.lora
    assert isinstance(ps, PromptSet) and ps.num_virtual == V and em.cloud.lora_blocks == []
    assert ps.peft_state_dict()["prompt_embeddings"].abs().min() > 0  # a random start: the check is not trivial
    pm = peft_reference(tiny.model, ps)
    batches = sst2_batches(STEPS)
    assert any((b.attention_mask == 0).any() for b in batches), "padded batches must be covered"
    ref_losses = train_peft(pm, batches)
    split_losses = train_edge_steps(em, batches, LR)
    rel = [abs(a - b) / abs(b) for a, b in zip(split_losses, ref_losses)]
    assert max(rel) <= 1e-4, rel
    assert split_losses[-1] < split_losses[0]
    # the same trained prompts (PEFT's saved form)
    gap = ps.peft_state_dict()["prompt_embeddings"] - peft.get_peft_model_state_dict(pm)["prompt_embeddings"]
    assert gap.abs().max().item() <= 1e-4

    # The adapter the edge saves loads with PEFT onto the full model and reproduces the edge's logits.
    full = assert_peft_reproduces_edge(em, tiny.model, tmp_path / "adapter", batches[:3], virtual=V)
    assert full.peft_config["default"].peft_type == {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}[method]
    link.close()


@pytest.mark.parametrize("method", METHODS)
def test_the_cloud_sees_v_more_tokens_and_nothing_else(cloud, tiny, method):
    """Per step: the hidden state, a bool mask and the output gradient up, the cloud output and the input
    gradient down, all [B, V + T]; the same messages as frozen split; both ends count the same bytes."""
    em, _, link = make_edge(cloud, tiny, peft=method, prompt_tokens=V)
    records = []
    for b in sst2_batches(2):
        loss, _ = em.loss(b)
        loss.backward()
        tr = em.cloud.last_traffic
        B, T_ = b.input_ids.shape
        bt = B * (T_ + V)
        assert (tr.payload_up, tr.payload_down) == (bt * H * 4 + bt + bt * H * 4, 2 * bt * H * 4)
        assert (tr.messages_up, tr.messages_down) == (2, 2)
        records.append(tr)
    stats = link.close()
    assert stats.bytes_received == sum(r.bytes_up for r in records)
    assert stats.bytes_sent == sum(r.bytes_down for r in records)
    assert stats.steps == 2


# --------------------------------------------------------------------------------------- refused before a step

def test_bad_options_are_refused_before_anything_runs(capsys, cloud, tmp_path):
    refused(capsys, train_args(cloud, tmp_path / "a", "--peft", "prompt", "--prompt-tokens", "0"),
            r"--prompt-tokens must be at least 1, got 0")
    refused(capsys, train_args(cloud, tmp_path / "b", "--peft", "ptuning", "--prompt-tokens", "-3"),
            r"--prompt-tokens must be at least 1, got -3")
    refused(capsys, train_args(cloud, tmp_path / "c", "--peft", "ptuning", "--prompt-init-text", "Review:"),
            r"--prompt-init-text is prompt tuning's")


def test_a_prompt_longer_than_the_cloud_accepts_is_refused_before_any_step(tiny, tmp_path, capsys):
    """batch x (V + the longest sequence) over the cloud's max_tokens_per_step: one line naming --prompt-tokens
    and --batch-size (or --eval-batch-size), and the cloud ran no step."""
    from cloud.sessions import CloudConfig
    from edge.config import EdgeConfig
    from edge.link import CloudLink
    from edge.trainer import link_config, train
    from tests.conftest import TOKENS
    small = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=1024, step_timeout=5.0))
    try:
        # SST-2 items are at most 96 tokens here: 4 x (300 + 96) and 16 x (20 + 96) are over 1024, 2 x (20 + 96) is not
        cases = [(dict(batch_size=4, prompt_tokens=300), "--prompt-tokens or --batch-size"),
                 (dict(batch_size=2, eval_batch_size=16, prompt_tokens=20), "--prompt-tokens or --eval-batch-size")]
        for kw, fix in cases:
            cfg = EdgeConfig.of(cloud=small.address, token=TOKENS["alice"], model="tiny-llama", progress=False,
                                peft="prompt", steps=2, eval_examples=16, **kw)
            link = CloudLink(link_config(cfg))
            closed = []
            close = link.close
            link.close = lambda: closed.append(close()) or closed[-1]
            with pytest.raises(ValueError) as e:
                train(cfg, loaded=copy.deepcopy(tiny), link=link)
            msg = str(e.value)
            assert "\n" not in msg and fix in msg and "max_tokens_per_step" in msg and "(1024 per step" in msg, msg
            assert closed and closed[0].steps == 0  # refused before training (and before the zero-shot eval)
        # the same through the command line: exit status 2, one line
        refused(capsys, ["edge", "train", "--cloud", small.address, "--token", TOKENS["alice"], "--model",
                         "tiny-llama", "--no-progress", "--peft", "prompt", "--prompt-tokens", "300", "--batch-size",
                         "4", "--eval-examples", "16", "--steps", "1", "--out-dir", str(tmp_path / "r")],
                r"lower --prompt-tokens or --batch-size")
    finally:
        small.stop()


def test_gpt2_prompts_go_before_the_learned_positions():
    """GPT-2 adds learned positions after the token embedding: PEFT prepends the prompts to the token embeddings and
    the model adds positions 0..V+T-1 over all of them; the edge does the same (Family.finish_embed)."""
    from cloud.sessions import CloudConfig
    from model.load import load_model
    gpt2 = load_model("tiny-gpt2")
    handle = CloudHandle(gpt2.model, CloudConfig())
    try:
        em, _, link = make_edge(handle, gpt2, peft="prompt", prompt_tokens=V)
        pm = peft_reference(gpt2.model, em.lora).eval()
        em.eval()
        with torch.no_grad():
            for b in sst2_batches(2):
                _, edge_logits = em.loss(b)
                peft_logits = pm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, V:]
                rows = torch.arange(len(b))
                assert (edge_logits - peft_logits[rows, b.answer_pos]).abs().max().item() <= 1e-4
        link.close()
    finally:
        handle.stop()
