import json

import pytest
import torch
from safetensors.torch import load_file

from ttt_video.config import Config, apply_overrides
from ttt_video.diffusion.flow import FlowMatching
from ttt_video.train import checkpoint as ckpt
from ttt_video.train.trainer import TrainingError, param_groups, train

TINY = ["model.dim=32", "model.depth=1", "model.num_heads=2", "model.ttt_mini_batch_size=16",
        "data.num_scenes=2", "data.frames_per_scene=4", "data.height=16", "data.width=16",
        "train.batch_size=2", "train.warmup_steps=2", "train.log_every=1", "train.save_every=2",
        "train.save_limit=2"]


def tiny(steps):
    return apply_overrides(Config(), TINY + [f"train.max_steps={steps}"])


def test_train_writes_checkpoints_log_and_resumes_exactly(tmp_path):
    straight = train(tiny(4), tmp_path / "a", progress=False)
    train(tiny(2), tmp_path / "b", progress=False)
    resumed = train(tiny(4), tmp_path / "b", resume=tmp_path / "b", progress=False)
    assert straight.name == resumed.name == "checkpoint-4"
    for k, v in load_file(straight / "model.safetensors").items():
        torch.testing.assert_close(load_file(resumed / "model.safetensors")[k], v, rtol=1e-5, atol=1e-6)
    losses = [[json.loads(line)["loss"] for line in open(p / "loss.jsonl")] for p in (tmp_path / "a", tmp_path / "b")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "b" / "last").read_text().strip() == "checkpoint-4"
    model, cfg = ckpt.load_model(tmp_path / "b")
    assert cfg == tiny(4)
    assert not list((tmp_path / "b").glob(".*"))  # no temporary folders left behind


def test_nan_loss_stops_with_step_and_keeps_last_good(tmp_path, monkeypatch):
    calls = []

    def loss(self, pred, target):
        calls.append(1)
        value = torch.mean((pred - target) ** 2)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(FlowMatching, "loss", loss)
    with pytest.raises(TrainingError, match="at step 3; last good checkpoint: .*checkpoint-2"):
        train(tiny(4), tmp_path, progress=False)
    assert (tmp_path / "last").read_text().strip() == "checkpoint-2"


def test_no_weight_decay_on_biases_norms_and_gates():
    from ttt_video.models import build_model

    model = build_model(tiny(1).model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    no = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("gate_fwd") for n in no) and any(n.endswith(".bias") for n in no)
    assert no_decay["weight_decay"] == 0.0


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    from ttt_video.models import build_model

    cfg = tiny(1)
    model = build_model(cfg.model)
    ckpt.save_checkpoint(tmp_path, 1, model, cfg)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, cfg)
    assert (tmp_path / "last").read_text().strip() == "checkpoint-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "last"]


def test_ctrl_c_saves_and_stops(tmp_path, monkeypatch):
    import os
    import signal

    calls = []

    def loss(self, pred, target):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.mean((pred - target) ** 2)

    monkeypatch.setattr(FlowMatching, "loss", loss)
    last = train(tiny(10), tmp_path, progress=False)
    assert last.name == "checkpoint-2" and len(calls) == 2
    assert (tmp_path / "last").read_text().strip() == "checkpoint-2"
