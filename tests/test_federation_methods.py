"""The federation trains every PEFT method: (IA)³, prompt tuning, P-tuning, DoRA, rsLoRA, bottleneck adapters (issue
13), prefix tuning (carried; with a projection its devices exchange the encoder's weights, as P-tuning's do).

In process (fast): two devices run the real ClientApp through the shared cloud from the server's initial adapter of
the method; the server's strategy merges their replies into exactly the examples-weighted mean of what they returned,
its deviation says which merges are exact, and the global adapter, saved in PEFT's format, loads with
`peft.PeftModel.from_pretrained` onto the full model and gives the logits the federation's own model gives (the
bottleneck adapters, which PEFT has not, in Tandem's format onto a local full model); the ClientApp's evaluation of
it is the edge's. Settings that cannot run fail before any round with one line. One short
Flower simulation (Ray) runs P-tuning, whose devices exchange the prompt encoder's weights, end to end.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import peft
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

import tasks as T
from cloud.federation.server_app import FederationConfig, initial_adapter, make_strategy, save_adapter
from cloud.federation.strategies.base import arrays_to_record, record_to_arrays
from edge.federation import client_app
from edge.methods import check_method
from edge.trainer import evaluate as evaluate_edge
from model.training import evaluate as evaluate_model
from protocol.federation import load_exchanged
from tests.conftest import TOKENS, make_edge, sst2_batches

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")  # tests/conftest.py

V = 4  # virtual tokens of the prompt methods
SIZES = (40, 24)  # training examples of the two devices: the FedAvg weights
# name -> (federation settings, the same method as `tandem edge train` flags, the merge is exact)
CASES = {
    "ia3-carried": (dict(peft="ia3", cloud_lora="carried", strategy="fedavg"),
                    dict(peft="ia3", cloud_lora="carried"), True),
    "prompt": (dict(peft="prompt", cloud_lora="none", strategy="fedavg", prompt_tokens=V),
               dict(peft="prompt", cloud_lora="none", prompt_tokens=V), True),
    "ptuning": (dict(peft="ptuning", cloud_lora="none", strategy="fedavg", prompt_tokens=V, ptuning_hidden=16),
                dict(peft="ptuning", cloud_lora="none", prompt_tokens=V, ptuning_hidden=16), False),
    "dora-carried-ffa": (dict(lora_dora=True, cloud_lora="carried", strategy="ffa"),
                         dict(lora_dora=True, cloud_lora="carried", lora_targets=("q_proj", "v_proj")), False),
    "rslora-dlora-ffa": (dict(lora_rslora=True, cloud_lora="edge", strategy="ffa"),
                         dict(lora_rslora=True, cloud_lora="edge", lora_targets=("q_proj", "v_proj")), True),
    "adapter-dlora": (dict(peft="adapter", cloud_lora="edge", strategy="fedavg", adapter_reduction=8),
                      dict(peft="adapter", cloud_lora="edge", adapter_reduction=8), False),
    "prefix-carried": (dict(peft="prefix", cloud_lora="carried", strategy="fedavg", prefix_tokens=V),
                       dict(peft="prefix", cloud_lora="carried", prefix_tokens=V), True),
    "prefix-projection-carried": (dict(peft="prefix", cloud_lora="carried", strategy="fedavg", prefix_tokens=V,
                                       prefix_projection=16),
                                  dict(peft="prefix", cloud_lora="carried", prefix_tokens=V, prefix_projection=16),
                                  False),
}


def saved_model(tiny, cfg: FederationConfig, path):
    """The full model with the saved global adapter: PEFT's own model of it, or for bottleneck adapters (Tandem's
    format; PEFT has none) a local copy of the full model with the adapters read back by `AdapterSet.load_peft`."""
    if cfg.peft != "adapter":
        return peft.PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(path)).eval()
    from model.tuners.adapter import AdapterConfig, AdapterSet
    full = copy.deepcopy(tiny.model).eval()
    blocks = list(range(full.config.num_hidden_layers))
    adapters = AdapterSet(full, AdapterConfig(cfg.adapter_reduction, (), blocks))
    adapters.load_peft(path)
    adapters.attach(full, blocks)
    full._keep = adapters  # the hooks' modules live as long as the model
    return full


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    """Two devices' own training files, of different sizes."""
    rows, folder, paths, at = T.load_split("sst2", "train"), tmp_path_factory.mktemp("devices"), [], 0
    for i, n in enumerate(SIZES):
        paths.append(folder / f"device-{i}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows[at:at + n]))
        at += n
    return paths


def device(i: int, train_file=None) -> Context:
    node_config = {"partition-id": i, "num-partitions": len(SIZES)}
    if train_file is not None:
        node_config["train-file"] = str(train_file)
    return Context(run_id=1, node_id=i + 1, node_config=node_config, state=RecordDict(), run_config={})


def tensors(adapter: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in adapter.items()}


@pytest.mark.parametrize("case", CASES)
def test_a_round_of_every_method_merges_to_the_weighted_mean_and_loads_in_peft(cloud, tiny, train_files, tmp_path,
                                                                                case):
    settings, edge_flags, exact = CASES[case]
    cfg = FederationConfig(model="tiny-llama", local_steps=2, batch_size=4, lr=0.02, eval_examples=12, **settings)
    cfg.check()
    start = initial_adapter(tiny.model, cfg)
    strategy, _ = make_strategy(cfg, 2, tiny.model)
    instructions = cfg.instructions(cloud.address, TOKENS["alice"])
    messages = list(strategy.configure_train(1, arrays_to_record(start), ConfigRecord(dict(instructions)),
                                             FakeGrid([1, 2])))
    assert [m.content["config"]["freeze-a"] for m in messages] == [cfg.strategy == "ffa"] * 2
    replies = [client_app.train(m, device(m.metadata.dst_node_id - 1, train_files[m.metadata.dst_node_id - 1]))
               for m in messages]
    returned = [record_to_arrays(r.content["arrays"]) for r in replies]
    weights = [int(r.content["metrics"]["num-examples"]) for r in replies]
    assert sorted(weights) == sorted(SIZES)
    for got in returned:  # the method's own weights, in the order sent, trained (FFA: A untouched)
        assert list(got) == list(start)
        for key in start:
            moved = np.abs(got[key] - start[key]).max()
            assert (moved == 0) if (cfg.strategy == "ffa" and ".lora_A." in key) else (moved > 0), key
    assert any(np.abs(returned[0][k] - returned[1][k]).max() > 1e-4 for k in start)  # two different devices

    arrays, metrics = strategy.aggregate_train(1, replies)
    merged = record_to_arrays(arrays)
    total = sum(weights)
    for key in start:  # FedAvg: the examples-weighted mean of what the devices returned (FFA: A as sent)
        if cfg.strategy == "ffa" and ".lora_A." in key:
            np.testing.assert_array_equal(merged[key], start[key])
            continue
        mean = sum(r[key].astype(np.float64) * (w / total) for w, r in zip(weights, returned))  # in float64
        np.testing.assert_array_equal(merged[key], mean.astype(np.float32))  # bit for bit, in the wire dtype
    assert metrics["num-examples"] == total
    # exact merges reproduce the mean of the devices' effective weights up to float rounding; the others do not
    assert (metrics["agg-deviation"] < 1e-6) if exact else (metrics["agg-deviation"] > 1e-5), metrics["agg-deviation"]

    # the global adapter in PEFT's format loads onto the full model and is the federation's model
    save_adapter(tiny.model, cfg, merged, tmp_path / "adapter")
    full = saved_model(tiny, cfg, tmp_path / "adapter")
    em, tok, link = make_edge(cloud, tiny, **edge_flags)
    try:
        load_exchanged(em.lora, tensors(merged), cfg)
        em.eval()
        shift = V if cfg.peft in ("prompt", "ptuning") else 0  # PEFT's logits have the virtual positions first
        with torch.no_grad():
            for b in sst2_batches(2):
                _, edge_logits = em.loss(b)
                peft_logits = full(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, shift:]
                gap = (edge_logits - peft_logits[torch.arange(len(b)), b.answer_pos]).abs().max().item()
                assert gap <= 1e-4, gap
        # the ClientApp's federated evaluation of the global adapter is the edge's own
        ev = list(strategy.configure_evaluate(1, arrays, ConfigRecord(dict(instructions)), FakeGrid([1])))
        assert len(ev) == 1
        reply = client_app.evaluate(ev[0], device(0))
        task = T.TASKS["sst2"]
        items = T.encode(task, T.load_split("sst2", "dev"), tok)[:12]
        mine = evaluate_edge(em, items, tok.pad_token_id or 0, 32, T.label_token_ids(task, tok))
        assert reply.content["metrics"]["accuracy"] == pytest.approx(mine["accuracy"])
        assert reply.content["metrics"]["num-examples"] == 12
    finally:
        link.close()


def test_ptuning_exchanges_the_encoder_and_saves_its_output(tiny, tmp_path):
    """P-tuning's rounds carry the prompt encoder's weights, not PEFT's saved form (its output, which would load as
    a table without the encoder); the final adapter is that output, and loads in PEFT as P_TUNING."""
    cfg = FederationConfig(model="tiny-llama", peft="ptuning", cloud_lora="none", strategy="fedavg",
                           prompt_tokens=V, ptuning_hidden=16)
    start = initial_adapter(tiny.model, cfg)
    assert cfg.exchange == "encoder" and "encoder.embedding.weight" in start
    assert any(k.startswith("encoder.mlp_head.") for k in start) and "prompt_embeddings" not in start
    save_adapter(tiny.model, cfg, start, tmp_path / "a")
    full = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(tmp_path / "a"))
    assert full.peft_config["default"].peft_type == "P_TUNING"
    from model.tuners.prompt import PromptConfig, PromptSet
    torch.manual_seed(cfg.seed)
    ps = PromptSet(tiny.model, PromptConfig("ptuning", V, None, 16))
    saved = full.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(saved, ps.prompts()[0].detach(), rtol=0, atol=1e-6)  # the encoder's output


@pytest.mark.parametrize("projection", [0, 16])
def test_prefix_exchanges_the_table_or_the_encoder_and_saves_the_prefixes(tiny, tmp_path, projection):
    """Prefix tuning's rounds carry PEFT's saved form (the prefix table) without a projection, and with one the
    encoder's weights (table and MLP: PEFT's saved form is only their output); the final adapter is the prefixes,
    and loads in PEFT as PREFIX_TUNING."""
    cfg = FederationConfig(model="tiny-llama", peft="prefix", cloud_lora="carried", strategy="fedavg",
                           prefix_tokens=V, prefix_projection=projection)
    cfg.check()
    start = initial_adapter(tiny.model, cfg)
    from model.tuners.prefix import PrefixConfig, PrefixSet
    torch.manual_seed(cfg.seed)
    ps = PrefixSet(tiny.model, PrefixConfig(V, projection or None))
    if projection:
        assert cfg.exchange == "encoder" and set(start) == set(ps.state_dict()) and "prompt_embeddings" not in start
        assert any(k.startswith("encoder.transform.") for k in start)
    else:
        assert cfg.exchange == "peft" and list(start) == ["prompt_embeddings"]
        np.testing.assert_array_equal(start["prompt_embeddings"], ps.encoder.embedding.weight.detach().numpy())
    save_adapter(tiny.model, cfg, start, tmp_path / "a")
    full = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(tmp_path / "a"))
    assert full.peft_config["default"].peft_type == "PREFIX_TUNING"
    saved = full.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(saved, ps.flat().detach(), rtol=0, atol=1e-6)  # the prefixes: the encoder's output


BAD = {  # settings -> what the one line says
    "peft=ia3 (cloud-lora edge by default)": (dict(peft="ia3"), "peft ia3 takes cloud-lora"),
    "prompt with DLoRA": (dict(peft="prompt", cloud_lora="edge", strategy="fedavg"), "peft prompt takes cloud-lora none"),
    "ffa with ia3": (dict(peft="ia3", cloud_lora="carried", strategy="ffa"), "strategy ffa merges peft lora only"),
    "ffa with prompt": (dict(peft="prompt", cloud_lora="none"), 'give strategy "fedavg"'),
    "a LoRA option with ia3": (dict(peft="ia3", cloud_lora="none", strategy="fedavg", lora_r=4),
                               "lora-r is an option of peft lora, not of peft ia3"),
    "an (IA)3 option with LoRA": (dict(ia3_targets="k_proj"), "ia3-targets is an option of peft ia3"),
    "DoRA with DLoRA": (dict(lora_dora=True, cloud_lora="edge"), "lora-dora needs the base weights"),
    "init text with ptuning": (dict(peft="ptuning", cloud_lora="none", strategy="fedavg", prompt_init_text="good"),
                               "prompt-init-text is prompt tuning's"),
    "no virtual tokens": (dict(peft="prompt", cloud_lora="none", strategy="fedavg", prompt_tokens=0),
                          "prompt-tokens must be at least 1"),
    "an unknown method": (dict(peft="bitfit"), "peft must be one of"),
    "ffa with adapters": (dict(peft="adapter"), "strategy ffa merges peft lora only"),
    "an adapter option with prompt": (dict(peft="prompt", cloud_lora="none", strategy="fedavg", adapter_reduction=4),
                                      "adapter-reduction is an option of peft adapter"),
    "adapters carried": (dict(peft="adapter", cloud_lora="carried", strategy="fedavg"),
                         "peft adapter takes cloud-lora none or edge"),
    "the emulator with ia3": (dict(peft="ia3", cloud_lora="none", strategy="fedavg", emulator_devices="0",
                                   emulator_bundle="b"), "offsite emulator train plain LoRA"),
    "prefix with DLoRA": (dict(peft="prefix", cloud_lora="edge", strategy="fedavg"),
                          "peft prefix takes cloud-lora carried"),
    "ffa with prefix": (dict(peft="prefix", cloud_lora="carried"), "strategy ffa merges peft lora only"),
    "no prefix tokens": (dict(peft="prefix", cloud_lora="carried", strategy="fedavg", prefix_tokens=0),
                         "prefix-tokens must be at least 1"),
    "a negative projection": (dict(peft="prefix", cloud_lora="carried", strategy="fedavg", prefix_projection=-1),
                              "prefix-projection must be at least 1"),
    "a prefix option with ptuning": (dict(peft="ptuning", cloud_lora="none", strategy="fedavg", prefix_tokens=4),
                                     "prefix-tokens is an option of peft prefix, not of peft ptuning"),
}


@pytest.mark.parametrize("case", BAD)
def test_settings_that_cannot_run_fail_in_one_line_before_any_round(case):
    settings, says = BAD[case]
    with pytest.raises(ValueError) as err:
        FederationConfig.from_run_config({k.replace("_", "-"): v for k, v in {"model": "tiny-llama",
                                                                              **settings}.items()})
    assert says in str(err.value) and "\n" not in str(err.value)


def test_tandem_federate_refuses_ffa_with_ia3_before_anything_starts(capsys, tmp_path):
    from cli.main import main
    with pytest.raises(SystemExit) as exit_:
        main(["federate", "--devices", "2", "--model", "tiny-llama", "--peft", "ia3", "--cloud-lora", "none",
              "--strategies", "fedavg,ffa", "--out", str(tmp_path / "fed")])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tandem: error:")]
    assert len(err) == 1 and "strategy ffa merges peft lora only" in err[0], err
    assert not (tmp_path / "fed").exists()  # no partition written, no backend started


def test_the_method_settings_reach_every_device():
    cfg = FederationConfig(peft="prompt", cloud_lora="none", strategy="fedavg", prompt_tokens=7,
                           prompt_init_text="a fine film")
    ins = client_app.Instructions.read(cfg.instructions("h:1", "t"), {"partition-id": 1})
    ec = client_app.edge_config(ins, None, 3)
    assert (ec.peft.method, ec.peft.prompt_tokens, ec.peft.prompt_init_text) == ("prompt", 7, "a fine film")
    assert ec.lora.targets == ()  # LoRA's options stay LoRA's: the edge would refuse them with prompt tuning
    ia3 = FederationConfig(peft="ia3", cloud_lora="carried", strategy="fedavg", ia3_targets="k_proj,down_proj",
                           ia3_feedforward="down_proj")
    ec = client_app.edge_config(client_app.Instructions.read(ia3.instructions("h:1", "t"), {}), None, 3)
    assert (ec.peft.ia3_targets, ec.peft.ia3_feedforward, ec.lora.cloud) == (("k_proj", "down_proj"),
                                                                             ("down_proj",), "carried")
    dora = FederationConfig(lora_dora=True, lora_rslora=True, cloud_lora="carried")
    ins = client_app.Instructions.read(dora.instructions("h:1", "t"), {})
    ins.freeze_a = True
    ec = client_app.edge_config(ins, None, 3)
    assert (ec.lora.dora, ec.lora.rslora, ec.lora.freeze_a) == (True, True, True)
    for projection, want in ((0, None), (12, 12)):  # 0: no projection, the edge's default
        prefix = FederationConfig(peft="prefix", cloud_lora="carried", strategy="fedavg", prefix_tokens=6,
                                  prefix_projection=projection)
        ec = client_app.edge_config(client_app.Instructions.read(prefix.instructions("h:1", "t"), {}), None, 3)
        assert (ec.peft.method, ec.peft.prefix_tokens, ec.peft.prefix_projection, ec.lora.cloud) == (
            "prefix", 6, want, "carried")
        check_method(ec)  # the edge takes them: no other method's option set


# ---- one Flower simulation, end to end ----------------------------------------------------------------------------

def test_tandem_federate_runs_ptuning_end_to_end(tmp_path, tiny):
    """Two devices, one round of P-tuning through Ray and the shared cloud: the devices exchange the encoder's
    weights, the global adapter is saved in PEFT's form, and PEFT's model of it scores the dev set as the
    federation's last evaluation did."""
    from sim.federation.cli import main as federate_main
    out = tmp_path / "fed"
    rc = federate_main(["--devices", "2", "--model", "tiny-llama", "--rounds", "1", "--local-steps", "2",
                        "--batch-size", "4", "--lr", "0.02", "--eval-examples", "12", "--partitioner", "iid",
                        "--strategies", "fedavg", "--cloud-lora", "none", "--peft", "ptuning", "--prompt-tokens",
                        str(V), "--ptuning-hidden", "16", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "fedavg" / "report.json").read_text())
    assert rep["adapter"]["method"] == "ptuning" and rep["adapter"]["exchange"] == "encoder"
    assert rep["adapter"]["parameters"] == V * 64 + (64 * 16 + 16) + (16 * 16 + 16) + (16 * 64 + 64)
    r = rep["rounds"][1]
    assert r["devices"] == 2 and r["split_steps"] == 4 and r["deviation"] > 0
    for c in r["clients"]:  # the encoder goes down and comes back at its size
        assert c["adapter_bytes_down"] == c["adapter_bytes_up"] == rep["adapter"]["bytes"]
    full = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(out / "fedavg" / "adapter")).eval()
    assert full.peft_config["default"].peft_type == "P_TUNING"
    task, tok = T.TASKS["sst2"], T.tiny_tokenizer()
    dev = T.encode(task, T.load_split("sst2", "dev"), tok)[:12]

    def hidden(batch):
        out_ = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        return out_.hidden_states[-1][:, V:]
    with torch.no_grad():
        scored = evaluate_model(hidden, full.base_model.get_output_embeddings(), task, dev, tok.pad_token_id or 0,
                                T.label_token_ids(task, tok))
    assert r["dev_accuracy"] == pytest.approx(scored["accuracy"]) and r["dev_examples"] == 12
