import json

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ttt_video.cli import main
from ttt_video.config import apply_overrides
from ttt_video.errors import UserError
from ttt_video.models.svd import SVD
from ttt_video.presets import get_preset
from ttt_video.sample.export import read_video
from ttt_video.sample.pipeline import generate
from ttt_video.train import checkpoint as ckpt
from ttt_video.train.trainer import train

from ..data.videos import ramp_frames, write_video


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A landscape clip with a condition image and a portrait clip, 8 frames each at 8 fps."""
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "wide.mp4", ramp_frames(8, 16, 24), 8)
    write_video(root / "tall.mp4", ramp_frames(8, 24, 16), 8)
    imageio.imwrite(root / "wide.png", np.full((32, 48, 3), 180, np.uint8))
    lines = [{"video": "wide.mp4", "caption": "unused", "task": "i2v", "cond_image": "wide.png"},
             {"video": "tall.mp4", "caption": "unused"}]
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "manifest.jsonl"


def svd_config(folder, manifest, steps):
    """The svd-xt-finetune preset, made tiny: 4 frames in 16x24 and 24x16 buckets (2 items each)."""
    return apply_overrides(get_preset("svd-xt-finetune"), [
        f"model.pretrained={folder}", f"data.vae={folder / 'vae'}", f"data.manifest={manifest}",
        "data.fps=8", "data.frames_per_scene=4", "data.height=16", "data.width=24", "data.buckets=16x24,24x16",
        "train.batch_size=2", f"train.max_steps={steps}", "train.mixed_precision=no", "train.lr=1e-3",
        "train.warmup_steps=1", "train.save_every=2", "train.log_every=1", "train.tensorboard=false",
        "diffusion.steps=2"])


def test_svd_trains_resumes_and_generates_from_an_image(svd_pipeline, manifest, tmp_path, capsys, monkeypatch):
    folder = svd_pipeline[0]
    shapes, forward = set(), SVD.forward

    def recording(self, latents, *args, **kwargs):
        shapes.add((tuple(latents.shape), tuple(kwargs["cond"].shape)))
        return forward(self, latents, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(SVD, "forward", recording)
        straight = train(svd_config(folder, manifest, 3), tmp_path / "a", progress=False)
    assert shapes == {((2, 4, 4, 8, 12), (2, 5, 4, 8, 12)), ((2, 4, 4, 12, 8), (2, 5, 4, 12, 8))}  # both buckets
    train(svd_config(folder, manifest, 2), tmp_path / "b", progress=False)
    resumed = train(svd_config(folder, manifest, 3), tmp_path / "b", resume=tmp_path / "b", progress=False)
    assert straight.name == resumed.name == "checkpoint-3"
    losses = [[json.loads(line)["loss"] for line in open(p / "loss.jsonl")] for p in (tmp_path / "a", tmp_path / "b")]
    assert len(losses[0]) == 3 and all(np.isfinite(losses[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    weights = load_file(straight / "model.safetensors")
    for k, v in weights.items():
        torch.testing.assert_close(load_file(resumed / "model.safetensors")[k], v, rtol=1e-5, atol=1e-6)
    before = {f"unet.{k}": v for k, v in svd_pipeline[1].unet.state_dict().items()}
    changed = {k for k, v in weights.items() if not torch.equal(v, before[k])}
    assert changed and all(".temporal_" in k or ".time_" in k for k in changed)  # the temporal adapter
    model, cfg = ckpt.load_model(straight)
    assert cfg.model.arch == "svd" and cfg.diffusion.objective == "edm"

    image = tmp_path / "first.png"
    imageio.imwrite(image, ramp_frames(1, 32, 48)[0])
    out = tmp_path / "video.mp4"
    code = main(["generate", "--image", str(image), "--checkpoint", str(tmp_path / "a"), "--num-frames", "6",
                 "--out", str(out), "--no-progress"])
    assert code == 0 and f"video: {out}" in capsys.readouterr().out
    frames = read_video(out)
    assert len(frames) == 6 and frames.shape[1] * 3 == frames.shape[2] * 2  # 16x24, enlarged for players
    assert out.with_suffix(".png").exists()

    elsewhere = ["--out", str(tmp_path / "other.mp4")]
    for command, msg in [(["generate", *elsewhere], "Stable Video Diffusion model takes --image alone"),
                         (["generate", "a caption", "--image", str(image), *elsewhere], "takes no captions"),
                         (["extend", "a caption", "--video", str(out), *elsewhere], "takes an image"),
                         (["evaluate", "--num-videos", "1"], "a Stable Video Diffusion model takes an image")]:
        code = main([*command, "--checkpoint", str(tmp_path / "a"), "--no-progress"])
        assert code == 2 and msg in capsys.readouterr().err
    with pytest.raises(UserError, match="generates from an image: give --image"):
        generate([], checkpoint=tmp_path / "a", out=out, progress=False)


def test_svd_run_refuses_validation_samples(svd_pipeline, manifest, tmp_path):
    cfg = apply_overrides(svd_config(svd_pipeline[0], manifest, 1), ["train.validate_every=1"])
    with pytest.raises(UserError, match="validate_every is not supported for arch svd"):
        train(cfg, tmp_path / "run", progress=False)
