"""Getting the backbone: the pinned SmolLM2 GGUF, clear errors when it is missing or corrupt, HF folders."""
from __future__ import annotations

import copy

import pytest
import torch

from model import load as L
from model import smollm2
from model.segments import Cut
from tests.conftest import grpc_dlora_edge


def test_missing_model_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    with pytest.raises(L.ModelNotFound, match="tandem models fetch"):
        L.load_model("smollm2")
    with pytest.raises(L.ModelNotFound, match="not a Hugging Face model folder"):
        L.load_model(str(tmp_path))
    with pytest.raises(L.ModelNotFound, match="unknown model"):
        L.load_model("no-such-thing")


def test_corrupt_cache_is_detected_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    path = smollm2.smollm2_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF but not really")
    with pytest.raises(L.ModelNotFound, match="corrupt.*fetch --force"):
        L.load_model("smollm2")


def test_hf_folder_round_trip(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path / "m")
    again = L.load_model(str(tmp_path / "m"), with_tokenizer=False).model
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tiny.model(ids).logits)
    assert L.fingerprint(again) == L.fingerprint(tiny.model)


def test_cut_bounds():
    assert list(Cut(1, 1, 30).cloud) == list(range(1, 29))
    for k, m in ((0, 1), (1, 0), (15, 15)):
        with pytest.raises(ValueError):
            Cut(k, m, 30)


@pytest.mark.slow
def test_smollm2_gguf_is_the_pinned_file_and_loads():
    path = smollm2.fetch_smollm2()  # cached: only checks the sha256
    assert smollm2.sha256_of(path) == smollm2.SMOLLM2_SHA256
    loaded = L.load_model("smollm2")
    cfg = loaded.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert loaded.tokenizer(" positive", add_special_tokens=False)["input_ids"] == [2731]


@pytest.mark.slow
def test_smollm2_dlora_matches_local_peft(tmp_path):
    """The headline equivalence on the real model: DLoRA through gRPC vs PEFT on the full model, 3 steps."""
    import peft
    import tasks as T
    from tests.reference import peft_local as ref
    loaded = L.load_model("smollm2")
    server, (em, tok, link) = grpc_dlora_edge(loaded)
    try:
        pm = ref.peft_model(copy.deepcopy(loaded.model), em.lora)
        task = T.TASKS["sst2"]
        items = T.encode(task, T.load_split("sst2", "train")[:24], tok)
        batches = list(T.batches(task, items, 8, tok.pad_token_id))
        ref_losses, _ = ref.train_steps(pm, task, batches, 1e-3)
        opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-3, weight_decay=0.0)
        for b, expected in zip(batches, ref_losses):
            opt.zero_grad()
            loss, _ = em.loss(b)
            loss.backward()
            opt.step()
            assert abs(loss.item() - expected) / expected <= 1e-4
        em.lora.save_peft(tmp_path / "adapter", "smollm2")
        full = peft.PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(tmp_path / "adapter")).eval()
        em.eval()
        with torch.no_grad():
            _, edge_logits = em.loss(batches[0])
            logits = full(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask).logits
        rows = torch.arange(len(batches[0]))
        assert (edge_logits - logits[rows, batches[0].answer_pos]).abs().max().item() <= 1e-4
        link.close()
    finally:
        server.stop(0)
