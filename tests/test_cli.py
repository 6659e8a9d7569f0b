import json
import os
import subprocess
import sys

import pytest

from ttt_video.cli import main
from ttt_video.sample.export import read_video

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
