"""`tandem demo` end to end on the tiny model: an embedded cloud, two edges on loopback, everything it promises."""
from __future__ import annotations

import copy
import json

import peft
import pytest

import tasks as T
from cli.main import main
from tests.reference import peft_local as ref

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tandem_demo_trains_two_edges_and_writes_what_it_promises(tmp_path, capsys, tiny):
    out = tmp_path / "demo"
    main(["demo", "--model", "tiny-llama", "--clients", "2", "--steps", "3", "--batch-size", "4",
          "--eval-examples", "8", "--out", str(out)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the headline, one JSON line
    summary = json.loads((out / "metrics.json").read_text())
    assert (out / "loss.png").stat().st_size > 10_000
    assert set(summary["clients"]) == set(last["clients"]) == {"edge-0", "edge-1"}
    tokens = json.loads((out / "tokens.json").read_text())
    task, tok = T.TASKS["sst2"], T.tiny_tokenizer()
    pad_id, label_ids = tok.pad_token_id or 0, T.label_token_ids(task, tok)
    dev = T.encode(task, T.load_split("sst2", "dev"), tok)[:8]
    for name, m in summary["clients"].items():
        assert [r["step"] for r in m["steps"]] == [0, 1, 2]
        assert m["config"]["data"] == {"task": "sst2", "task_file": None, "train_file": None, "dev_file": None,
                                       "shard": int(name[-1]), "num_shards": 2}
        # the saved adapter is a PEFT adapter, and with it PEFT scores the dev set exactly as the edge did
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(out / name / "adapter"))
        assert any(v.abs().max() > 0 for k, v in pm.state_dict().items() if "lora_B" in k)  # trained, not B = 0
        assert ref.evaluate(pm, task, dev, pad_id, label_ids) == pytest.approx(m["eval_after"]["accuracy"])
        with pm.disable_adapter():  # zero-shot (LoRA B = 0) is the base model's accuracy, measured once, shared
            assert ref.evaluate(pm, task, dev, pad_id, label_ids) == pytest.approx(m["eval_before"]["accuracy"])
        assert m["eval_after"]["examples"] == m["eval_before"]["examples"] == 8
        head = last["clients"][name]
        assert head["acc_before"] == m["eval_before"]["accuracy"] and head["acc_after"] == m["eval_after"]["accuracy"]
        assert head["bytes_up_per_step"] == pytest.approx(sum(r["bytes_up"] for r in m["steps"]) / 3)
        assert head["bytes_down_per_step"] == pytest.approx(sum(r["bytes_down"] for r in m["steps"]) / 3)
        # the edge writes no bearer token anywhere
        for path in (out / "metrics.json", out / name / "metrics.json"):
            assert not any(t in path.read_text() for t in tokens.values())
    assert summary["clients"]["edge-1"]["eval_before"]["shared_with"] == "edge-0"
