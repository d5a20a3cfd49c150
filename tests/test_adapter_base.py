"""An adapter names a base that loads from anywhere: `AutoPeftModelForCausalLM.from_pretrained(adapter)` works.

A local HF folder (or .gguf file) is named by its absolute path; "smollm2" by its de-quantized HF folder in the
cache (model/load.py `smollm2_hf_folder`); a tiny test config keeps its name (no files to point at)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from model import load as L
from model import smollm2 as S
from model.tuners.lora import LoRAConfig, LoRASet
from tests.conftest import grpc_dlora_edge, randomize_lora_b

pytestmark = pytest.mark.usefixtures("one_thread")


def _base_of(adapter) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_adapter_from_relative_hf_folder_loads_with_auto_peft_elsewhere(tmp_path, tiny, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    tiny.model.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    model = L.load_model("m", with_tokenizer=False).model  # the spec as typed: a relative folder
    blocks = [0, 2, 5]
    lora = LoRASet(model, LoRAConfig(r=4, alpha=8, blocks=blocks))
    randomize_lora_b(lora)
    lora.save_peft(tmp_path / "adapter", "m")
    assert _base_of(tmp_path / "adapter") == str((tmp_path / "m").resolve())

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # "m" means nothing here
    full = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ids = torch.randint(3, 300, (2, 11))
    lora.attach(model, blocks)  # Tandem's own LoRA, hooked onto the base linears
    with torch.no_grad():
        expected = model(ids).logits
        got = full(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert (expected - tiny.model(ids).logits).abs().max().item() > 1e-4  # the adapter does change the logits


def test_base_names_per_kind_of_spec(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert S.smollm2_hf_path() == tmp_path / "home" / "models" / "smollm2-hf"
    assert L.adapter_base_name("tiny-llama") == "tiny-llama"  # documented: load it with load_model + PeftModel
    assert L.adapter_base_name("") == ""
    assert L.adapter_base_name("w/model.gguf") == str(tmp_path / "w" / "model.gguf")
    (tmp_path / "hf").mkdir()
    assert L.adapter_base_name("hf") == str(tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="tandem"):  # no GGUF fetched: no folder to write, the alias stays
        assert L.adapter_base_name("smollm2") == "smollm2"
    assert "tandem models fetch" in caplog.text
    assert not S.smollm2_hf_path().exists()


@pytest.mark.slow
def test_smollm2_adapter_names_its_hf_folder_and_auto_peft_matches_the_edge(tmp_path, monkeypatch):
    """The HF folder is written lazily at save (here into an empty TANDEM_HOME holding only the GGUF), holds
    exactly the GGUF's de-quantized weights, and AutoPeftModelForCausalLM on the adapter gives the edge's logits."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import tasks as T
    gguf = S.fetch_smollm2()  # the real cache: only checks the sha256
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    S.smollm2_path().parent.mkdir(parents=True)
    S.smollm2_path().symlink_to(gguf)
    loaded = L.load_model("smollm2")
    server, (em, tok, link) = grpc_dlora_edge(loaded)
    try:
        randomize_lora_b(em.lora)
        assert not S.smollm2_hf_path().exists()
        em.lora.save_peft(tmp_path / "adapter", "smollm2")
        folder = S.smollm2_hf_path()
        assert _base_of(tmp_path / "adapter") == str(folder)
        assert (folder / "config.json").exists() and (folder / S.SMOLLM2_HF_MARKER).exists()

        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        mine, theirs = loaded.model.state_dict(), hf.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # the same de-quantized numbers
        del hf, theirs
        text = "The movie was great, positive!"
        assert AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]

        task = T.TASKS["sst2"]
        batch = next(iter(T.batches(task, T.encode(task, T.load_split("sst2", "train")[:8], tok), 8,
                                    tok.pad_token_id)))
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        full = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
        em.eval()
        with torch.no_grad():
            _, edge_logits = em.loss(batch)
            logits = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rows = torch.arange(len(batch))
        assert (edge_logits - logits[rows, batch.answer_pos]).abs().max().item() <= 1e-4
        link.close()
    finally:
        server.stop(0)
