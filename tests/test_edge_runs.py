"""Run folders (--resume, --overwrite, a crashed run resumed), the training knobs (warmup and schedule, clipping,
accumulation) and --tensorboard; on the tiny model through the tiny cloud."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from cli.main import main
from edge.config import EdgeConfig
from edge.trainer import train
from model.training import FitOptions, fit
from tests.cli_helpers import refused, train_args
from tests.conftest import TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ run folders

def test_an_existing_run_is_refused_unless_resume_with_the_same_settings_or_overwrite(cloud, tmp_path, capsys):
    out = tmp_path / "run"
    base = train_args(cloud, out, "--no-eval-before", "--no-eval-after", "--steps", "2")
    main(base)
    refused(capsys, base, "already holds a run .*--resume.*--overwrite")
    refused(capsys, [*base, "--resume", "--lr", "0.5", "--lora-targets", "q_proj,k_proj"],
            r"--lora-targets \(default\) -> q_proj,k_proj; --lr 0.01 -> 0.5")
    main([*base, "--resume", "--eval-examples", "4", "--device", "cpu"])  # same run: evaluation, device may differ
    assert len(json.loads((out / "metrics.json").read_text())["steps"]) == 2
    with pytest.raises(SystemExit) as e:  # one or the other
        main([*base, "--resume", "--overwrite"])
    assert e.value.code == 2
    (out / "mine.txt").write_text("not Tandem's")
    main([*base, "--overwrite", "--lora-targets", "q_proj,k_proj"])
    from safetensors.torch import load_file
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("k_proj" in k for k in keys) and not any("v_proj" in k for k in keys)
    assert (out / "mine.txt").read_text() == "not Tandem's"  # --overwrite removes the run's files only
    assert json.loads((out / "config.json").read_text())["lora"]["targets"] == ["q_proj", "k_proj"]


def test_resume_names_flags_and_lets_settings_newer_than_the_run_keep_their_default():
    from edge.runs import differences
    saved = EdgeConfig.of(lr=0.01).public()
    del saved["optim"]["warmup_steps"]  # a run saved before --warmup-steps existed
    assert differences(saved, EdgeConfig.of(lr=0.01, eval_examples=7, device="cuda", patience=1).public()) == []
    assert differences(saved, EdgeConfig.of(lr=0.01, warmup_steps=2, k=2).public()) == ["--k 1 -> 2",
                                                                                        "--warmup-steps 0 -> 2"]


def test_a_crashed_run_resumes_and_keeps_its_zero_shot_score(cloud, tiny, tmp_path):
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKENS["alice"], model="tiny-llama", steps=4, batch_size=4,
                        checkpoint_every=2, eval_examples=8, eval_after=False, progress=False,
                        out_dir=str(tmp_path / "run"))

    def crash(em, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, loaded=copy.deepcopy(tiny), step_hook=crash)
    before = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_before"]
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, loaded=copy.deepcopy(tiny), existing="refuse")
    resumed = train(cfg, loaded=copy.deepcopy(tiny)).metrics  # the library resumes a matching run
    assert [r["step"] for r in resumed["steps"]] == [0, 1, 2, 3] and resumed["eval_before"] == before


# -------------------------------------------------------------------------------------------- training knobs

def _toy(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    w = torch.nn.Parameter(torch.randn(4, 1, generator=g))
    return w, x, y


def test_warmup_schedules_follow_hugging_face_and_resume_at_the_same_rate(tmp_path):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    from model.training import Checkpoint
    for schedule, hf in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        w, x, y = _toy()
        opts = FitOptions(steps=10, lr=0.1, warmup_steps=3, schedule=schedule)
        run = fit(lambda b: ((x[b] @ w - y[b]) ** 2).mean(), [w], iter(lambda: slice(None), None), opts)
        ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        ref = hf(ref_opt, 3, 10)
        expected = []
        for _ in range(10):
            expected.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
        assert run.lrs == pytest.approx(expected) and run.lrs[0] == 0.0

    def run_to(folder, stop=None):
        w, x, y = _toy()

        def before(step):
            if step == stop:
                raise KeyboardInterrupt

        opts = FitOptions(steps=6, lr=0.1, warmup_steps=2, schedule="cosine", checkpoint_every=2)
        try:
            r = fit(lambda b: ((x[b] @ w - y[b]) ** 2).mean(), [w], iter(lambda: slice(None), None), opts,
                    state=lambda: {"w": w.detach().clone()}, load_state=lambda d: w.data.copy_(d["w"]),
                    checkpoint=Checkpoint(folder), before_step=before)
        except KeyboardInterrupt:
            return None, None
        return r, w.detach().clone()

    full, w_full = run_to(tmp_path / "a")
    assert run_to(tmp_path / "b", stop=3) == (None, None)
    resumed, w_resumed = run_to(tmp_path / "b")
    assert resumed.start == 2 and resumed.lrs == pytest.approx(full.lrs[2:])
    assert torch.allclose(w_full, w_resumed)


def test_accumulation_equals_one_big_batch_and_clipping_bounds_the_norm():
    w, x, y = _toy(8)
    big, w_big = [slice(0, 8)], torch.nn.Parameter(w.detach().clone())
    fit(lambda b: ((x[b] @ w_big - y[b]) ** 2).mean(), [w_big], iter(big * 3), FitOptions(steps=3, lr=0.05))
    w_acc = torch.nn.Parameter(w.detach().clone())
    halves = [slice(0, 4), slice(4, 8)] * 3
    r = fit(lambda b: ((x[b] @ w_acc - y[b]) ** 2).mean(), [w_acc], iter(halves),
            FitOptions(steps=3, lr=0.05, grad_accum_steps=2))
    assert torch.allclose(w_big, w_acc, atol=1e-6) and len(r.losses) == 3
    norms = []
    fit(lambda b: ((x[b] @ w - y[b]) ** 2).mean() * 100, [w], iter(big * 3), FitOptions(steps=3, max_grad_norm=0.5),
        after_step=lambda step, loss, s: norms.append(float(w.grad.norm())))
    assert max(norms) <= 0.5 + 1e-6
    with pytest.raises(ValueError):
        FitOptions(schedule="step")
    with pytest.raises(ValueError):
        FitOptions(grad_accum_steps=0)


def test_accumulation_through_the_cloud_counts_every_micro_step_and_tensorboard_has_the_curves(cloud, tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = tmp_path / "tb"
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKENS["alice"], model="tiny-llama", cloud_lora="edge", steps=2,
                        batch_size=2, grad_accum_steps=2, warmup_steps=1, schedule="linear", max_grad_norm=1.0,
                        eval_before=False, eval_after=False, progress=False, tensorboard=str(board))
    m = train(cfg, loaded=copy.deepcopy(tiny)).metrics
    assert m["cloud_session"]["steps"] == 4  # each micro-batch is its own cloud step
    assert sum(r["bytes_up"] for r in m["steps"]) == m["cloud_session"]["bytes_received"]
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(scalars) >= {"train/loss", "train/lr", "wire/bytes_up", "wire/bytes_down"}
    assert scalars["train/lr"] == pytest.approx([0.0, 1e-3])
    assert scalars["wire/bytes_up"] == [r["bytes_up"] for r in m["steps"]]
