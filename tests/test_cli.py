import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ttt_video.cli import main
from ttt_video.config import Config, apply_overrides
from ttt_video.encoders.text import save_text_cache, text_settings
from ttt_video.errors import UserError
from ttt_video.models import build_model
from ttt_video.presets import get_preset
from ttt_video.sample import pipeline
from ttt_video.sample.export import read_video, write_video
from ttt_video.train.checkpoint import load_model, save_checkpoint

from .train.test_trainer import TINY


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_with_bundled_model(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    code, stdout, _ = run_cli(["generate", "a blue square moves left", "it moves down as a circle",
                               "--steps", "4", "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    assert f"video: {out}" in stdout and f"contact sheet: {out.with_suffix('.png')}" in stdout
    assert read_video(out).shape[0] == 16
    code, _, _ = run_cli(["generate", "a red circle moves up", "--seconds", "2.5", "--fps", "8", "--steps", "2",
                          "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and read_video(out).shape[0] == 20


def test_train_then_generate_from_checkpoint(tmp_path, capsys):
    sets = [a for s in TINY + ["train.max_steps=2"] for a in ("--set", s)]
    code, stdout, _ = run_cli(["train", "--preset", "shapes-tiny", *sets, "--output-dir", str(tmp_path / "run"),
                               "--no-progress"], capsys)
    assert code == 0 and "checkpoint-2" in stdout
    story = tmp_path / "story.json"
    story.write_text(json.dumps([{"text": "a red circle moves up"}, "it moves left as a square"]))
    out = tmp_path / "g.mp4"
    code, _, _ = run_cli(["generate", "--storyboard", str(story), "--checkpoint", str(tmp_path / "run"),
                          "--steps", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and read_video(out).shape[0] == 8


@pytest.mark.parametrize("args,msg", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--set", "train.max_steps=x"], "train.max_steps must be int"),
    (["generate"], "no prompts"),
    (["generate", "a", "--checkpoint", "/no/such/ckpt"], "checkpoint not found: /no/such/ckpt"),
    (["generate", "a", "--seconds", "0"], "--seconds must be positive"),
    (["generate", "a", "--seconds", "-2"], "--seconds must be positive"),
    (["generate", "a", "--out", "/proc/forbidden/v.mp4"], "cannot write to /proc/forbidden/v.mp4"),
    (["evaluate", "--json", "/proc/forbidden/s.json"], "cannot write to /proc/forbidden/s.json"),  # before sampling
    (["generate", "--storyboard", "STORY"], "is not valid JSON"),
    (["generate", "a", "b", "c", "--num-frames", "8"], "3 captions need at least 3 segments"),
    (["train", "--set", "train.lr=nan"], "train.lr must be at least 0, got nan"),
    (["train", "--set", "train.max_steps=0"], "train.max_steps must be at least 1, got 0"),
    (["train", "--set", "train.save_every=0"], "train.save_every must be at least 1"),
    (["train", "--set", "train.caption_dropout=1.5"], "train.caption_dropout must be between 0 and 1"),
    (["train", "--set", "train.mixed_precision=fp8"], "train.mixed_precision must be one of no, bf16, fp16"),
    (["train", "--set", "train.device=tpu"], "train.device must be auto, cpu, cuda or cuda:N"),
    (["train", "--set", "model.num_heads=3"], "model.num_heads must divide model.dim (128)"),
    (["plan", "--gpu-memory", "24GB", "--set", "train.batch_size=0"], "train.batch_size must be at least 1"),
    (["train", "--set", "model.arch=bogus", "--output-dir", "RUN"], "unknown model arch 'bogus'"),
    (["generate", "a", "--out", "DIR"], "is a directory"),
    (["generate", "a", "  "], "caption 2 is empty"),
    (["generate", "a", "--seconds", "nan"], "--seconds must be positive, got nan"),
    (["generate", "a", "--out", "notes.txt"], "must end in .mp4 or .mkv or .mov"),
    (["train", "--output-dir", "STORY"], "is a file"),
    (["generate", "a", "--height", "64"], "--height applies only with --model (a CogVideoX folder)"),
    (["generate", "a", "--ttt", "none"], "--ttt applies only with --model"),
    (["generate", "a", "--vae-tiling"], "--vae-tiling applies only with --model"),
    (["generate", "--model", "DIR", "--storyboard", "STORY", "--window", "16"],
     "--window applies to the built-in models, not with --model"),
    (["generate", "--model", "DIR", "--storyboard", "STORY", "--text-cache", "STORY"],
     "--text-cache applies to the built-in models"),
    (["generate", "--model", "DIR", "--storyboard", "STORY", "--ttt-checkpoint", "DIR", "--ttt", "linear"],
     "--ttt picks the kind of fresh TTT layers; a --ttt-checkpoint brings its own"),
    (["generate", "--model", "DIR", "--storyboard", "STORY", "--seconds", "nan"],
     "--seconds must be positive, got nan"),
    (["generate", "--model", "DIR", "--storyboard", "STORY", "--fps", "0"], "--fps must be positive, got 0"),
    (["generate", "--model", "DIR", "--storyboard", "STORY", "--ema"],
     "--ema needs a --ttt-checkpoint from `ttt-video train`"),
    (["generate", "a", "--ema"], "has no ema.safetensors"),
])
def test_user_errors_exit_2_with_one_line(args, msg, tmp_path, capsys):
    story = tmp_path / "bad.json"
    story.write_text("[{'text': 1}")
    (tmp_path / "adir").mkdir()
    named = {"STORY": story, "RUN": tmp_path / "run", "DIR": tmp_path / "adir"}
    args = [str(named.get(a, a)) for a in args]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [["generate", "a", "--steps", "x"], ["generate", "a", "--no-such-flag"], ["bogus"],
                                  ["bench", "seams", "--steps", "x"], ["bench", "ttt", "--heads", "many"]])
def test_a_malformed_command_line_is_one_line(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.endswith("(see --help)\n") and "usage:" not in err


def test_console_script_exit_status(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "-m", "ttt_video.cli", "generate", "x", "--checkpoint", str(tmp_path)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("ttt-video: error: checkpoint") and "Traceback" not in p.stderr


@pytest.mark.parametrize("arch", ["tiny-dit", "sora-dit", "titans-dit"])
def test_train_image_to_video_then_generate_from_an_image(tmp_path, capsys, arch):
    from PIL import Image

    sets = [a for s in TINY + ["train.max_steps=2", "model.condition_frames=1", "data.i2v_ratio=0.5",
                               f"model.arch={arch}"] for a in ("--set", s)]
    code, stdout, _ = run_cli(["train", *sets, "--output-dir", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0 and "checkpoint-2" in stdout
    image = tmp_path / "first.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    out = tmp_path / "i2v.mp4"
    code, _, _ = run_cli(["generate", "a red circle moves up", "it moves left", "--image", str(image),
                          "--checkpoint", str(tmp_path / "run"), "--steps", "2", "--out", str(out),
                          "--no-progress"], capsys)
    assert code == 0
    frames = read_video(out)
    assert frames.shape[0] == 8
    assert abs(float(frames[0, ..., 0].mean()) - 200) < 20  # the first frame is the image
    code, _, err = run_cli(["generate", "a", "--image", str(image), "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and "not trained with image conditioning" in err and err.count("\n") == 1
    code, _, err = run_cli(["generate", "a", "--image", str(tmp_path / "none.png"), "--no-progress"], capsys)
    assert code == 2 and "image not found" in err


def test_bench_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "ttt", "--help"])
    assert e.value.code == 0 and "--seconds" in capsys.readouterr().out


def tiny_checkpoint(folder, *overrides):
    """A checkpoint of the tiny test model with random weights, written without training."""
    cfg = apply_overrides(get_preset("shapes-tiny"), TINY + list(overrides))
    return save_checkpoint(folder, 1, build_model(cfg.model), cfg, training_state={"step": 1})


def assert_one_line_error(code, err, *parts):
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


SAMPLING = [["generate", "a", "--out", "OUT", "--no-progress"], ["evaluate", "--num-videos", "1", "--no-progress"],
            ["extend", "a", "--video", "VIDEO", "--out", "OUT", "--no-progress"]]


def fill(command, tmp_path):
    """`command` with VIDEO (a 16x16 clip of 8 grey frames), MANIFEST (a manifest of that clip)
    and OUT (a file in a new folder) filled in."""
    video, manifest = tmp_path / "clip.mp4", tmp_path / "manifest.jsonl"
    if not video.is_file():
        write_video(np.full((8, 16, 16, 3), 128, np.uint8), video, fps=8)
        manifest.write_text(json.dumps({"video": video.name, "caption": "grey"}) + "\n")
    named = {"VIDEO": video, "MANIFEST": manifest, "OUT": tmp_path / "out" / "v.mp4"}
    return [str(named.get(a, a)) for a in command]


@pytest.mark.parametrize("command", SAMPLING)
@pytest.mark.parametrize("damage,reason", [
    pytest.param(lambda b: b"\xff" * 64, "header too large", id="garbage"),
    pytest.param(lambda b: b[: len(b) // 2], "incomplete metadata", id="truncated"),
])
def test_a_corrupt_checkpoint_is_named_in_one_line(command, damage, reason, tmp_path, capsys):
    weights = tiny_checkpoint(tmp_path / "run") / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    code, _, err = run_cli([*fill(command, tmp_path), "--steps", "1", "--checkpoint", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, f"checkpoint weights {weights} is not a readable safetensors file", reason)


@pytest.mark.parametrize("command", SAMPLING)
def test_a_checkpoint_of_another_size_names_the_first_misfit(command, tmp_path, capsys):
    small = tiny_checkpoint(tmp_path / "small")
    large = tiny_checkpoint(tmp_path / "large", "model.dim=64")
    (small / "model.safetensors").write_bytes((large / "model.safetensors").read_bytes())
    code, _, err = run_cli([*fill(command, tmp_path), "--steps", "1", "--checkpoint", str(small)], capsys)
    assert_one_line_error(code, err, f"{small / 'model.safetensors'} does not fit the model: ")
    assert re.search(r"has shape \(\d+(, \d+)*\), the model's is \(\d+(, \d+)*\) \(\d+ of \d+ tensors differ", err)


def test_resuming_from_a_checkpoint_of_another_size_or_a_corrupt_state(tmp_path, capsys):
    large = tiny_checkpoint(tmp_path / "large", "model.dim=64")
    train = ["train", *[a for s in TINY + ["train.max_steps=2"] for a in ("--set", s)], "--output-dir",
             str(tmp_path / "run"), "--no-progress", "--resume"]
    code, _, err = run_cli([*train, str(large)], capsys)
    assert_one_line_error(code, err, f"{large / 'model.safetensors'} does not fit the model: ", "differ in shape")
    small = tiny_checkpoint(tmp_path / "small")
    (small / "training_state.pt").write_bytes(b"\x80\x04 not a pickle")
    code, _, err = run_cli([*train, str(small)], capsys)
    assert_one_line_error(code, err, f"{small / 'training_state.pt'} is corrupt or truncated")


def test_a_text_cache_gives_the_same_video(tmp_path, capsys):
    cache = tmp_path / "text.safetensors"
    assert run_cli(["cache-text", "--out", str(cache)], capsys)[0] == 0
    videos = []
    for extra in ([], ["--text-cache", str(cache)]):
        out = tmp_path / f"v{len(videos)}.mp4"
        code, _, _ = run_cli(["generate", "a red circle moves up", "--steps", "2", "--out", str(out), "--no-progress",
                              *extra], capsys)
        assert code == 0
        videos.append(read_video(out))
    np.testing.assert_array_equal(*videos)


class ZeroEncoder:
    def encode(self, captions):
        return torch.zeros(len(captions), 16, 384), torch.ones(len(captions), 16)


@pytest.mark.parametrize("made_with,msg", [
    (None, "text cache not found: CACHE"),
    ("garbage", "text cache CACHE is not a readable safetensors file"),
    ("unrecorded", "text cache CACHE records no text encoder settings"),
    (["data.text_max_length=8"], "text cache CACHE was made with text_max_length=8, the config has 16"),
    (["data.text_encoder=t5", "data.t5_model=T5"], "text cache CACHE was made with text_encoder=['t5', 'T5', "),
])
@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_missing_corrupt_or_mismatched_text_cache(command, made_with, msg, tmp_path, capsys):
    cache = tmp_path / "text.safetensors"
    if made_with == "garbage":
        cache.write_bytes(b"\0" * 100)
    elif made_with == "unrecorded":
        save_file({"embeddings": torch.zeros(1, 16, 384), "mask": torch.ones(1, 16, dtype=torch.uint8)}, cache,
                  metadata={"captions": json.dumps(["a"])})
    elif made_with:
        save_text_cache(ZeroEncoder(), ["a"], cache, text_settings(apply_overrides(Config(), made_with).data))
    args = {"generate": ["generate", "a", "--out", str(tmp_path / "v.mp4")],
            "train": ["train", *[a for s in TINY + ["train.max_steps=1"] for a in ("--set", s)],
                      "--output-dir", str(tmp_path / "run")]}[command]
    code, _, err = run_cli([*args, "--text-cache", str(cache), "--no-progress"], capsys)
    assert_one_line_error(code, err, msg.replace("CACHE", str(cache)))


@pytest.mark.parametrize("device,cuda_devices,msg", [
    ("tpu", 0, "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("cuda:x", 0, "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ("cuda", 0, "--device cuda: PyTorch sees no CUDA devices on this machine"),
    ("cuda:1", 1, "--device cuda:1: PyTorch sees 1 CUDA device on this machine"),
])
@pytest.mark.parametrize("command", [*SAMPLING, ["prepare", "--manifest", "MANIFEST", "--out", "OUT"],
                                     ["plan", "--gpu-memory", "24GB"]])
def test_an_unknown_or_absent_device(command, device, cuda_devices, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    code, _, err = run_cli([*fill(command, tmp_path), "--device", device], capsys)
    assert_one_line_error(code, err, msg)


def test_train_on_an_absent_cuda_device(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, _, err = run_cli(["train", "--set", "train.device=cuda", "--output-dir", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, "train.device cuda: PyTorch sees no CUDA devices on this machine")


@pytest.mark.parametrize("content", [b"", b"not a video\n", bytes(range(256)) * 8])
def test_extending_a_file_that_is_not_a_video(content, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("loaded the model before reading the video")

    monkeypatch.setattr(pipeline, "load_model", load)
    video = tmp_path / "notes.mp4"
    video.write_bytes(content)
    code, _, err = run_cli(["extend", "a", "--video", str(video), "--out", str(tmp_path / "v.mp4")], capsys)
    assert_one_line_error(code, err, f"cannot read video {video}: ")


@pytest.mark.parametrize("args,msg", [
    (["generate", "a", "--window", "12"], "--window must be a positive multiple of the model's segment length 8"),
    (["generate", "a", "--window", "16", "--overlap", "16"], "--overlap must be a multiple of 8 in [0, 16)"),
    (["extend", "a", "--window", "12"], "--window must be a positive multiple of the model's segment length 8"),
    (["extend", "a", "--overlap", "5"], "--overlap must be a multiple of 8 in [0, 24)"),
    (["extend", "a", "--num-frames", "0"], "--num-frames must be positive, got 0"),
    (["extend", "a", "--overlap", "16", "--video", "SHORT"], "the video to extend has 8 frames; the overlap needs 16"),
])
def test_window_and_length_checked_before_the_model_loads(args, msg, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("loaded the model before checking the window")

    monkeypatch.setattr(pipeline, "load_model", load)
    short = tmp_path / "short.mp4"
    write_video(np.zeros((8, 32, 32, 3), np.uint8), short, fps=8)
    if args[0] == "extend" and "--video" not in args:
        args = [*args, "--video", str(short)]
    args = [str(short) if a == "SHORT" else a for a in args]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "v.mp4")], capsys)
    assert_one_line_error(code, err, msg)


@pytest.mark.parametrize("args,msg", [
    (["data", "--clips", "0"], "--clips must be positive, got 0"),
    (["data", "--seconds", "nan"], "--seconds must be positive, got nan"),
    (["seams", "--num-videos", "0"], "--num-videos must be positive, got 0"),
    (["seams", "--steps", "-1"], "--steps must be positive, got -1"),
    (["quality", "--num-videos", "0"], "--num-videos must be positive, got 0"),
    (["quality", "--extend-steps", "0"], "--extend-steps must be positive, got 0"),
    (["quality", "--jobs", "0"], "--jobs must be positive, got 0"),
    (["quality", "--mixers", "attention,rnn"], "--mixers: unknown mixer 'rnn'; choose from attention, swa, "),
    (["quality", "--seeds", "0,x"], "--seeds must be comma-separated integers of at least 0, got '0,x'"),
    (["quality", "--seeds", "-1"], "--seeds must be comma-separated integers of at least 0, got '-1'"),
    (["data", "--workers", "2,"], "--workers must be comma-separated integers of at least 0, got '2,'"),
    (["data", "--bucket", "144by256"], "--bucket '144by256' is not HEIGHTxWIDTH (e.g. 576x1024)"),
    (["data", "--source-size", "360x"], "--source-size '360x' is not HEIGHTxWIDTH (e.g. 576x1024)"),
    (["parallel", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["parallel", "--device", "cuda"], "--device cuda: PyTorch sees no CUDA devices on this machine"),
    (["parallel", "--num-processes", "0"], "--num-processes must be positive, got 0"),
    (["parallel", "--modes", "ddp,fdsp"], "--modes: unknown mode 'fdsp'; choose from single, ddp, fsdp"),
    (["seams", "--window", "12"], "--window must be a positive multiple of the model's segment length 8, got 12"),
    (["seams", "--window", "16", "--overlap", "16"], "--overlap must be a multiple of 8 in [0, 16), got 16"),
    (["seams", "--num-segments", "3"], "3 segments (24 frames) fit in one window of 24: no seam to measure"),
    (["cogvideox", "--batch", "0"], "--batch must be positive, got 0"),
    (["cogvideox", "--layers", "-2"], "--layers must be positive, got -2"),
])
def test_benchmark_arguments_refused_in_one_line_before_any_work(args, msg, tmp_path, capsys, monkeypatch):
    from ttt_video.eval import seams

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(seams, "load_model", lambda *a, **k: pytest.fail("loaded the model before the checks"))
    code, out, err = run_cli(["bench", *args, *(["--out", str(tmp_path / "q")] if args[0] in ("quality", "parallel")
                                                else [])], capsys)
    assert_one_line_error(code, err, msg)
    assert out == "" and not (tmp_path / "q").exists()


@pytest.mark.parametrize("command", [
    ["generate", "a", "--checkpoint", "BAD", "--out", "NEW/v.mp4"],
    ["extend", "a", "--video", "NOTES", "--out", "NEW/v.mp4"],
    ["evaluate", "--checkpoint", "BAD", "--json", "NEW/scores.json"],
    ["train", "--resume", "BAD", "--output-dir", "NEW/run"],
    ["prepare", "--manifest", "EMPTY", "--out", "NEW/cache"],
    ["export-lora", "GOOD", "--out", "NEW/lora"],
], ids=lambda command: command[0])
def test_a_refused_run_leaves_no_new_folder(command, tmp_path, capsys):
    bad = tiny_checkpoint(tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "notes.mp4").write_text("notes")
    (tmp_path / "empty.jsonl").write_text("")
    named = {"BAD": bad, "GOOD": tiny_checkpoint(tmp_path / "good"), "NOTES": tmp_path / "notes.mp4",
             "EMPTY": tmp_path / "empty.jsonl"}
    args = [str(named[a]) if a in named else a.replace("NEW", str(tmp_path / "new")) for a in command]
    code, _, err = run_cli([*args, *(["--no-progress"] if command[0] != "export-lora" else [])], capsys)
    assert_one_line_error(code, err)
    assert not (tmp_path / "new").exists()


def test_ema_samples_the_moving_average(tmp_path, capsys):
    """--ema samples with the run's moving average: another video than the trained weights give,
    with the same seed; evaluate and extend take it too."""
    sets = [a for s in TINY + ["train.max_steps=2", "train.ema_decay=0.5"] for a in ("--set", s)]
    run = tmp_path / "run"
    assert run_cli(["train", *sets, "--output-dir", str(run), "--no-progress"], capsys)[0] == 0
    videos = {}
    for flags in ([], ["--ema"]):
        out = tmp_path / f"v{len(flags)}.mp4"
        code, _, err = run_cli(["generate", "a red circle", "--checkpoint", str(run), "--steps", "2", "--out", str(out),
                                "--no-progress", *flags], capsys)
        assert code == 0, err
        videos[len(flags)] = read_video(out)
    assert videos[0].shape == videos[1].shape and not np.array_equal(videos[0], videos[1])
    assert run_cli(["evaluate", "--checkpoint", str(run), "--num-videos", "1", "--steps", "1", "--ema",
                    "--no-progress"], capsys)[0] == 0
    assert run_cli(["extend", "a", "--video", str(tmp_path / "v1.mp4"), "--checkpoint", str(run), "--steps", "1",
                    "--ema", "--num-frames", "4", "--out", str(tmp_path / "x.mp4"), "--no-progress"], capsys)[0] == 0


@pytest.mark.parametrize("damage,msg", [
    (lambda ema, k: {**ema, k: torch.zeros(ema[k].shape[0] + 1, *ema[k].shape[1:])}, "{k} has shape ("),
    (lambda ema, k: {n: v for n, v in ema.items() if n != k}, "it lacks {k} (1 of "),
    (lambda ema, k: {**ema, "extra.weight": torch.zeros(1)}, "it has extra.weight, which the model lacks"),
], ids=["shape", "missing", "unknown"])
def test_ema_weights_that_do_not_fit_are_named_in_one_line(damage, msg, tmp_path, capsys):
    sets = [a for s in TINY + ["train.max_steps=2", "train.ema_decay=0.5"] for a in ("--set", s)]
    train = ["train", *sets, "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert run_cli(train, capsys)[0] == 0
    ema_file = tmp_path / "run" / "checkpoint-2" / "ema.safetensors"
    ema = load_file(ema_file)
    k = next(n for n, v in ema.items() if v.dim() == 2)
    save_file(damage(ema, k), ema_file)
    expected = f"{ema_file} does not fit the model: {msg.format(k=k)}"
    with pytest.raises(UserError, match=re.escape(expected)):
        load_model(ema_file.parent, ema=True)
    code, _, err = run_cli([*train, "--set", "train.max_steps=4", "--resume", "auto"], capsys)
    assert_one_line_error(code, err, expected)
