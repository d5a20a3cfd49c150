"""Export a tuned model to ONNX and run it with onnxruntime: inference on the edge without PyTorch.

The exported graph maps (input_ids [B, T], attention_mask [B, T]) to logits [B, T, V], with B and T dynamic, and is
written with the tokenizer beside it:

    out/model.onnx
    out/tokenizer/...     (when the model has one)
    out/onnx_info.json    what was exported (task, label words, opset)

The exporter is PyTorch's TorchScript one (`dynamo=False`) on eager attention, which handles transformers' causal
mask construction; the graph is checked against PyTorch on the export example and padded batches by the tests.
`answer` classifies a prompt with the task's label words (as the trainers evaluate) or continues it greedily.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

import tasks as T

OPSET = 17


class LogitsOnly(torch.nn.Module):
    """A causal LM as a pure function of (input_ids, attention_mask) -> logits: no cache, no dict output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(model, out_dir: str | Path, tokenizer=None, task: str | None = None, opset: int = OPSET) -> Path:
    """Write `model` as out_dir/model.onnx (and its tokenizer). Returns the .onnx path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 0, 0]])
    mask = (ids != 0).long()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(LogitsOnly(model.eval()), (ids, mask), str(path), dynamo=False, opset_version=opset,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"},
                                            "logits": {0: "batch", 1: "seq"}})
    finally:
        model.set_attn_implementation(previous)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out / "tokenizer"))
    info = {"opset": opset, "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "task": task,
            "label_words": T.TASKS[task].label_words if task else None, "layers": model.config.num_hidden_layers}
    (out / "onnx_info.json").write_text(json.dumps(info, indent=1))
    return path


def session(path: str | Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(sess, input_ids: torch.Tensor | np.ndarray, attention_mask: torch.Tensor | np.ndarray) -> np.ndarray:
    as_np = lambda x: (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64)  # noqa: E731
    return sess.run(["logits"], {"input_ids": as_np(input_ids), "attention_mask": as_np(attention_mask)})[0]


@torch.no_grad()
def max_abs_diff(model, sess, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest |onnxruntime - PyTorch| over the logits of real (unpadded) positions."""
    ref = LogitsOnly(model.eval())(input_ids, attention_mask).numpy()
    got = ort_logits(sess, input_ids, attention_mask)
    real = attention_mask.numpy().astype(bool)
    return float(np.abs(got - ref)[real].max())


def classify(sess, tokenizer, task: str, text: str) -> tuple[str, list[float]]:
    """The task's answer to `text` (its prompt filled in), and the label words' probabilities among themselves."""
    t = T.TASKS[task]
    fields = {k: text for k in ("sentence", "text", "sentence1", "sentence2")}
    ids = tokenizer(t.prompt(fields), add_special_tokens=False)["input_ids"][-t.max_len:]
    logits = ort_logits(sess, np.array([ids]), np.ones((1, len(ids))))[0, -1]
    label_logits = logits[T.label_token_ids(t, tokenizer)]
    p = np.exp(label_logits - label_logits.max())
    p /= p.sum()
    return t.label_words[int(p.argmax())].strip(), [float(x) for x in p]


def generate(sess, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of `prompt` (the whole sequence is re-run each token: simple, fine for short answers)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        seq = ids + new
        nxt = int(ort_logits(sess, np.array([seq]), np.ones((1, len(seq))))[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
    return tokenizer.decode(new)
