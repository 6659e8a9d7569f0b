import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ttt_video.config import Config, apply_overrides
from ttt_video.diffusion.flow import FlowMatching
from ttt_video.errors import UserError
from ttt_video.train import checkpoint as ckpt
from ttt_video.train import trainer
from ttt_video.train.trainer import TrainingError, lr_lambda, param_groups, train

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


def test_resume_takes_groups_and_rates_from_the_config_and_moments_from_the_checkpoint(tmp_path, monkeypatch):
    """Resumed with another learning rate and the TTT parameters in groups of their own: the groups
    and rates are the new config's, each parameter's AdamW moments the checkpoint's (by name)."""
    train(tiny(2), tmp_path, progress=False)
    loaded = {}
    real = trainer._load_optimizer_state

    def spy(model, optimizer, saved, accelerator, path):
        real(model, optimizer, saved, accelerator, path)
        names = {id(p): n for n, p in model.named_parameters()}
        loaded["groups"] = {g["name"] for g in optimizer.param_groups}
        loaded["moments"] = [torch.equal(optimizer.state[p]["exp_avg"], saved["state"][names[id(p)]]["exp_avg"])
                             for g in optimizer.param_groups for p in g["params"]]

    monkeypatch.setattr(trainer, "_load_optimizer_state", spy)
    cfg = apply_overrides(tiny(3), ["train.lr=0.002", "train.ttt_lr=0.003"])
    train(cfg, tmp_path, resume=tmp_path, progress=False)
    assert loaded["groups"] == {"base", "base_no_decay", "ttt", "ttt_no_decay"}
    assert loaded["moments"] and all(loaded["moments"])
    last = [json.loads(line) for line in open(tmp_path / "loss.jsonl")][-1]
    assert last["step"] == 3 and last["lr"] == pytest.approx(0.002 * lr_lambda(cfg.train)(3))


def test_resume_refuses_parameters_without_saved_moments(tmp_path):
    train(apply_overrides(tiny(2), ["train.adapter=ttt-only"]), tmp_path, progress=False)
    with pytest.raises(UserError, match="no optimizer state for .* trainable in this config"):
        train(tiny(3), tmp_path, resume=tmp_path, progress=False)


def test_nan_loss_stops_with_step_and_keeps_last_good(tmp_path, monkeypatch):
    calls = []

    def loss(self, pred, target, t=None):
        calls.append(1)
        value = torch.mean((pred - target) ** 2)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(FlowMatching, "loss", loss)
    with pytest.raises(TrainingError, match="at step 3; last good checkpoint: .*checkpoint-2"):
        train(tiny(4), tmp_path, progress=False)
    assert (tmp_path / "last").read_text().strip() == "checkpoint-2"


def test_param_groups_by_name():
    from ttt_video.models import build_model

    model = build_model(tiny(1).model)
    groups = {g["name"]: g for g in param_groups(model, 0.1, lr=1e-5, ttt_lr=1e-4)}
    assert set(groups) == {"base", "base_no_decay", "ttt", "ttt_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for g in ("base", "ttt") for p in groups[g]["params"])
    assert all(".ttt." in names[id(p)] for g in ("ttt", "ttt_no_decay") for p in groups[g]["params"])
    assert groups["ttt"]["lr"] == 1e-4 and groups["base"]["lr"] == 1e-5
    assert groups["base_no_decay"]["weight_decay"] == 0.0 and groups["base"]["weight_decay"] == 0.1
    no = {names[id(p)] for p in groups["ttt_no_decay"]["params"] + groups["base_no_decay"]["params"]}
    assert any(n.endswith("gate_fwd") for n in no) and any(n.endswith(".bias") for n in no)
    assert any(n.endswith(".ttt.b1") for n in no) and not any(n.endswith(".ttt.w1") for n in no)
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


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

    def loss(self, pred, target, t=None):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.mean((pred - target) ** 2)

    monkeypatch.setattr(FlowMatching, "loss", loss)
    last = train(tiny(10), tmp_path, progress=False)
    assert last.name == "checkpoint-2" and len(calls) == 2
    assert (tmp_path / "last").read_text().strip() == "checkpoint-2"


@pytest.mark.parametrize("adapter,trained", [
    ("full", lambda n: True),
    ("qkvo", lambda n: ".attn.qkv." in n or ".attn.out." in n),
    ("ttt-only", lambda n: ".ttt." in n),
    ("lora", lambda n: "lora_" in n),
])
def test_adapters_train_exactly_what_they_claim(tmp_path, adapter, trained):
    base = train(tiny(5), tmp_path / "base", progress=False)  # a "pretrained" model: adaLN gates open
    cfg = tiny(2)
    cfg.train.adapter, cfg.train.init_from, cfg.train.ema_decay = adapter, str(base), 0.5
    last = train(cfg, tmp_path / adapter, progress=False)
    model, _ = ckpt.load_model(last)
    after = model.state_dict()
    before = load_file(base / "model.safetensors")
    base_name = {k: k.replace("base_layer.", "") for k in after}  # peft renames the wrapped layers
    assert {base_name[k] for k in after if "lora_" not in k} == set(before)
    changed = {k for k in after if "lora_" in k or not torch.equal(after[k], before[base_name[k]])}
    assert changed == {k for k in after if trained(k)}
    assert all(after[k].abs().sum() > 0 for k in after if "lora_B" in k)  # B starts at zero
    averaged = ckpt.load_model(last, ema=True)[0].state_dict()  # the EMA holds the trained parameters
    averaged_differ = {k for k in after if not torch.equal(averaged[k], after[k])}
    assert averaged_differ and averaged_differ <= changed


def test_caption_dropout_really_drops(monkeypatch):
    from ttt_video.train import trainer

    seen = []
    real = trainer.encode_captions

    def spy(encoder, captions, drop=None):
        seen.append(drop.clone())
        return real(encoder, captions, drop)

    monkeypatch.setattr(trainer, "encode_captions", spy)
    cfg = tiny(6)
    cfg.train.caption_dropout = 0.5
    cfg.train.batch_size = 4
    train(cfg, __import__("tempfile").mkdtemp(), progress=False)
    drops = torch.cat(seen)
    assert drops.shape == (24, 2)
    assert 0.25 < drops.float().mean() < 0.75
    _, _, none = trainer.item_randomness(range(50), (1,), 2, 0.0, FlowMatching(), 0)
    assert not none.any()


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    a = tiny(2)
    b = tiny(2)
    b.train.batch_size, b.train.grad_accum_steps = 1, 2
    ra = train(a, tmp_path / "a", progress=False)
    rb = train(b, tmp_path / "b", progress=False)
    wa, wb = load_file(ra / "model.safetensors"), load_file(rb / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_ema_validation_samples_and_tensorboard(tmp_path):
    cfg = tiny(2)
    cfg.train.ema_decay = 0.5
    cfg.train.validate_every = 2
    cfg.train.validation_videos = 1
    last = train(cfg, tmp_path, progress=False)
    assert (last / "ema.safetensors").is_file()
    plain, _ = ckpt.load_model(last)
    averaged, _ = ckpt.load_model(last, ema=True)
    diff = [k for k, v in plain.state_dict().items() if not torch.equal(v, averaged.state_dict()[k])]
    assert diff
    assert (tmp_path / "samples" / "step-2-0.mp4").is_file() and (tmp_path / "samples" / "step-2-0.png").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    rec = json.loads((tmp_path / "loss.jsonl").read_text().splitlines()[-1])
    assert rec["samples_per_s"] > 0 and rec["peak_memory_gb"] > 0


def test_ddp_on_two_processes_matches_one_process(tmp_path):
    import os
    import subprocess
    import sys

    sets = [a for s in TINY + ["train.max_steps=3", "train.device=cpu", "train.tensorboard=false"]
            for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ttt_video.cli", "train",
           *sets, "--set", "train.batch_size=1", "--output-dir", str(tmp_path / "ddp"), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    single = train(apply_overrides(tiny(3), ["train.device=cpu"]), tmp_path / "one", progress=False)
    losses = [[json.loads(line)["loss"] for line in open(d / "loss.jsonl")]
              for d in (tmp_path / "ddp", tmp_path / "one")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    a, b = load_file(tmp_path / "ddp" / "checkpoint-3" / "model.safetensors"), load_file(single / "model.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_image_condition_of_a_batch():
    from ttt_video.data.dataset import task_for
    from ttt_video.encoders.vae import IdentityVAE
    from ttt_video.train.trainer import image_condition

    cfg = apply_overrides(Config(), ["data.i2v_ratio=0.5"]).data
    x0 = torch.randn(6, 3, 8, 4, 4)
    cond = image_condition({"video": x0}, x0, IdentityVAE(), list(range(6)), cfg)
    drawn = [task_for(None, 0.5, cfg.seed, i) == "i2v" for i in range(6)]
    assert cond.shape == (6, 4, 8, 4, 4) and 0 < sum(drawn) < 6
    for b, on in enumerate(drawn):
        torch.testing.assert_close(cond[b, :3, 0], x0[b, :, 0] * on)
        assert (cond[b, 3, 0] == on).all() and not cond[b, :, 1:].any()
    latents = torch.randn(2, 3, 1, 4, 4)
    cond = image_condition({"task": ["t2v", "i2v"], "cond_latents": latents}, x0[:2], None, [0, 1], cfg)
    assert not cond[0].any() and torch.equal(cond[1, :3, :1], latents[1])


def test_image_to_video_run_starts_from_an_unconditioned_checkpoint(tmp_path):
    first = train(tiny(2), tmp_path / "t2v", progress=False)
    cfg = apply_overrides(tiny(2), ["model.condition_frames=1", "data.i2v_ratio=1", f"train.init_from={first}"])
    last = train(cfg, tmp_path / "i2v", progress=False)
    weights = load_file(last / "model.safetensors")
    assert weights["cond_embed.weight"].abs().sum() > 0
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "i2v" / "loss.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_fp16_on_bf16_weights_warns_once(tmp_path):
    import warnings

    from ttt_video.models import build_model
    from ttt_video.train.trainer import warn_fp16_on_bf16

    cfg = tiny(1)
    ckpt.save_checkpoint(tmp_path / "bf16", 1, build_model(cfg.model).to(torch.bfloat16), cfg)
    ckpt.save_checkpoint(tmp_path / "fp32", 1, build_model(cfg.model), cfg)
    cfg.train.mixed_precision, cfg.train.init_from = "fp16", str(tmp_path / "bf16")
    expected = r"mixed_precision=fp16, but the starting weights in .*bf16.* are bf16"
    with pytest.warns(UserWarning, match=expected) as seen:
        warn_fp16_on_bf16(cfg)
    assert len(seen) == 1
    from diffusers import CogVideoXTransformer3DModel

    from ..models.test_cogvideox_ttt import TINY as COGVIDEOX

    CogVideoXTransformer3DModel(**COGVIDEOX).to(torch.bfloat16).save_pretrained(tmp_path / "cogvideox" / "transformer")
    cog = apply_overrides(Config(), ["model.arch=cogvideox-ttt", f"model.pretrained={tmp_path / 'cogvideox'}",
                                     "train.mixed_precision=fp16"])
    with pytest.warns(UserWarning, match="diffusion_pytorch_model.safetensors are bf16"):
        warn_fp16_on_bf16(cog)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for weights, precision in (("bf16", "bf16"), ("fp32", "fp16")):
            warn_fp16_on_bf16(apply_overrides(tiny(1), [f"train.init_from={tmp_path / weights}",
                                                        f"train.mixed_precision={precision}"]))


def test_frozen_weights_in_bf16_train_the_adapter_only(tmp_path):
    import os
    import subprocess
    import sys

    # a process of its own: Accelerate fixes the mixed precision once per process
    sets = [a for s in TINY + ["train.max_steps=2", "train.adapter=ttt-only", "train.mixed_precision=bf16",
                               "train.frozen_dtype=bfloat16", "train.device=cpu", "train.tensorboard=false"]
            for a in ("--set", s)]
    p = subprocess.run([sys.executable, "-m", "ttt_video.cli", "train", *sets, "--output-dir", str(tmp_path),
                        "--no-progress"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert weights["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert weights["blocks.0.ttt.ttt.qkv.weight"].dtype == torch.float32


def test_backward_runs_outside_autocast(tmp_path):
    """Autocast wraps the forward and the loss only (PyTorch's advice), so its cached half-precision
    copies of the trainable weights are gone before backward's peak (`ttt-video plan` counts them so)."""
    import os
    import subprocess
    import sys

    sets = [a for s in TINY + ["train.max_steps=2", "train.mixed_precision=bf16", "train.device=cpu",
                               "train.tensorboard=false"] for a in ("--set", s)]
    script = ("import sys, accelerate, torch\n"
              "real = accelerate.Accelerator.backward\n"
              "def backward(self, loss, **kw):\n"
              "    print('autocast in backward:', torch.is_autocast_enabled('cpu'))\n"
              "    return real(self, loss, **kw)\n"
              "accelerate.Accelerator.backward = backward\n"
              "from ttt_video.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", script, "train", *sets, "--output-dir", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("autocast in backward: False") == 2 and "True" not in p.stdout


def test_wandb_logging_and_resume_continue_one_run(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, sorted(scalars)))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["project"], kwargs["id"], kwargs["resume"]))
        return Run()
    import importlib.machinery

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probing for wandb look at it
    wandb.init = init
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = tiny(2)
    cfg.train.wandb_project, cfg.train.tensorboard = "shapes", False
    train(cfg, tmp_path, progress=False)
    train(apply_overrides(cfg, ["train.max_steps=3"]), tmp_path, resume=tmp_path, progress=False)
    inits = [c for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0] == inits[1] and inits[0][1:] == ("shapes", inits[0][2], "allow")
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3]
    assert calls[1][2] == ["lr/base", "lr/base_no_decay", "train/grad_norm", "train/loss", "train/peak_memory_gb",
                           "train/samples_per_s"]
    assert [c[0] for c in calls].count("finish") == 2


def test_wandb_project_without_wandb_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = tiny(1)
    cfg.train.wandb_project = "shapes"
    with pytest.raises(UserError, match=r"pip install 'ttt-video\[wandb\]'"):
        train(cfg, tmp_path, progress=False)
