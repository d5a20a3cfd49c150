"""ONNX export of both offsite models (the data owner's adapter + emulator, and the plugged full model): onnxruntime
must give PyTorch's logits within 1e-4 on batches of other shapes than the export example, padding included."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tasks as T
from emulator import onnx_export as X
from emulator.build import BuildConfig, build
from emulator.bundle import load_bundle
from emulator.plug import load_adapter, plug
from emulator.tune import TuneConfig, tune
from model.load import load_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the data owner's tuned model with LoRA merged, the plugged full model), from a LoRA run on a tiny Llama."""
    d = tmp_path_factory.mktemp("onnx")
    tiny = load_model("tiny-llama")
    build(BuildConfig(model="tiny-llama", bottom=2, top=1, drop=0.5, progress=False), d / "bundle", loaded=tiny)
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"review {i}\t{i % 2}\n" for i in range(24)))
    cfg = TuneConfig(mode="lora", steps=3, batch_size=4, lr=1e-2, eval_before=False, eval_examples=8,
                     train_file=str(d / "train.tsv"), dev_file=str(d / "train.tsv"), progress=False)
    adapter = tune(cfg, d / "bundle", d / "adapter")["_adapter"]
    adapter.merge()
    plugged = plug(tiny.model, load_adapter(d / "adapter"), load_bundle(d / "bundle").manifest)
    return d, adapter.model, plugged


def batches():
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding, as the trainers batch
    mask[2, 7:] = 0
    yield ids, mask
    yield torch.randint(3, 300, (1, 5)), torch.ones(1, 5, dtype=torch.long)


@pytest.mark.parametrize("which", ["owner", "plugged"])
def test_onnxruntime_matches_pytorch(models, which):
    d, owner, plugged = models
    model = owner if which == "owner" else plugged
    path = X.export_onnx(model, d / which, task="sst2")
    assert path.is_file() and model.config._attn_implementation == "sdpa"  # restored after the export
    info = json.loads((d / which / "onnx_info.json").read_text())
    assert info["opset"] >= 17 and info["layers"] == model.config.num_hidden_layers
    sess = X.session(path)
    for ids, mask in batches():
        assert X.max_abs_diff(model, sess, ids, mask) < 1e-4
    assert len(sess.get_inputs()) == 2 and sess.get_outputs()[0].name == "logits"


def test_the_two_models_differ(models):
    """The owner's model is the lossy emulator: its ONNX graph is smaller and answers differently."""
    d, owner, plugged = models
    a, b = X.export_onnx(owner, d / "o2"), X.export_onnx(plugged, d / "p2")
    assert a.stat().st_size < b.stat().st_size
    ids, mask = next(batches())
    assert np.abs(X.ort_logits(X.session(a), ids, mask) - X.ort_logits(X.session(b), ids, mask)).max() > 1e-3


class LetterTok:
    """Characters as tokens, leading spaces dropped: " negative" and " positive" start with different tokens."""
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 300 for c in text.lstrip(" ")]}


def test_classify_uses_the_task_prompt_and_label_words(models):
    d, owner, _ = models
    sess = X.session(X.export_onnx(owner, d / "c"))
    tok, task = LetterTok(), T.TASKS["sst2"]
    label_ids = T.label_token_ids(task, tok)
    assert len(set(label_ids)) == 2
    for text in ("a gripping, funny film", "dull and far too long", "x"):
        label, probs = X.classify(sess, tok, "sst2", text)
        assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-6
        ids = tok(task.prompt({"sentence": text}))["input_ids"]
        with torch.no_grad():
            ref = torch.softmax(owner(torch.tensor([ids])).logits[0, -1, label_ids], -1)
        assert np.allclose(probs, ref.numpy(), atol=1e-5)
        assert label == task.label_words[int(ref.argmax())].strip()
