import json

import pytest
import torch
from safetensors.torch import load_file

from ttt_video.cli import main
from ttt_video.config import Config, apply_overrides
from ttt_video.data.cache import prepare
from ttt_video.train.trainer import train

from ..train.test_trainer import TINY
from .videos import make_dataset

DATA = ["data.fps=8", "data.buckets=16x24,24x16", "train.max_steps=2", "train.tensorboard=false"]


def sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_prepare_then_train_from_the_cache_and_on_the_fly(manifest, tmp_path, capsys):
    root = manifest.parent
    code = main(["prepare", "--data-root", str(root), "--manifest", str(manifest), "--out", str(tmp_path / "cache"),
                 "--buckets", "16x24,24x16", "--no-progress", *sets(TINY + ["data.fps=8"])])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.splitlines() == [
        "skipped 6 (1 malformed manifest line, 1 missing file, 1 corrupt video, 1 truncated video, "
        "1 clip too short, 1 unreadable image)",
        f"cache: {tmp_path / 'cache'} (8 items, 8 new)"]
    assert out.err.count("warning: skipped") == 6

    data = TINY + DATA + ["data.source=manifest", f"data.manifest={manifest}", f"data.data_root={root}"]
    code = main(["train", *sets(data + ["data.i2v_ratio=0.5"]), "--output-dir", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr()
    assert code == 0 and "checkpoint-2" in out.out
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "loss.jsonl")]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert "epoch 1 (stopped at step 2): 11 items, skipped 6 (" in out.out


@pytest.mark.parametrize("args,msg", [
    (["--manifest", "/no/such.jsonl"], "manifest not found: /no/such.jsonl"),
    (["--manifest", "MANIFEST", "--strict"], "malformed manifest line: manifest.jsonl:4"),
    (["--manifest", "MANIFEST", "--buckets", "16by24"], "bucket '16by24' is not HEIGHTxWIDTH"),
    (["--manifest", "MANIFEST", "--vae", "/no/vae"], "VAE folder not found: /no/vae"),
    (["--manifest", "MANIFEST", "--set", "data.i2v_ratio=1.5"], "data.i2v_ratio must be between 0 and 1"),
])
def test_prepare_user_errors_exit_2_with_one_line(args, msg, manifest, tmp_path, capsys):
    args = [str(manifest) if a == "MANIFEST" else a for a in args]
    code = main(["prepare", "--out", str(tmp_path / "c"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert msg in err and err.strip().startswith("ttt-video: error:") and "Traceback" not in err


@pytest.mark.parametrize("lines,msg", [
    ([], "has no usable clip: 0 listed, skipped 0"),
    (["{not json", {"video": "missing.mp4", "caption": "x"}, {"video": "corrupt.mp4", "caption": "x"}],
     "has no usable clip: 2 listed, skipped 3 (1 malformed manifest line, 1 missing file, 1 corrupt video)"),
    ([{"video": "trunc.mp4", "caption": "x"}], "has no usable clip: 1 listed, skipped 1 (1 truncated video)"),
])
def test_prepare_refuses_a_manifest_without_a_usable_clip(lines, msg, manifest, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    code = main(["prepare", "--data-root", str(manifest.parent), "--manifest", str(bad), "--out",
                 str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"ttt-video: error: manifest {bad} {msg}"
    assert not (tmp_path / "cache").exists()


def test_cached_and_decoded_training_agree_and_resume_exactly(manifest, tmp_path):
    good = manifest.parent / "good.jsonl"
    good.write_text("".join(manifest.read_text().splitlines(keepends=True)[:3]))

    def cfg(steps, *extra):
        return apply_overrides(Config(), TINY + DATA + ["data.source=manifest", f"data.manifest={good}",
                                                        "data.i2v_ratio=0.5", f"train.max_steps={steps}", *extra])

    prepare(cfg(1).data, tmp_path / "cache", progress=False)
    cached = train(cfg(2, f"data.cache_dir={tmp_path / 'cache'}"), tmp_path / "cached", progress=False)
    train(cfg(1), tmp_path / "decoded", progress=False)  # decoded on the fly, stopped, resumed
    decoded = train(cfg(2), tmp_path / "decoded", resume=tmp_path / "decoded", progress=False)
    losses = [[json.loads(line)["loss"] for line in open(p.parent / "loss.jsonl")] for p in (cached, decoded)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for k, v in load_file(cached / "model.safetensors").items():
        torch.testing.assert_close(load_file(decoded / "model.safetensors")[k], v, rtol=1e-4, atol=1e-6)


def test_train_with_a_missing_manifest_exits_2(tmp_path, capsys):
    code = main(["train", *sets(TINY + ["data.source=manifest", "data.manifest=/no/m.jsonl"]),
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "ttt-video: error: manifest not found: /no/m.jsonl"
