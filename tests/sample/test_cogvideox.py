import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXTransformer3DModel

from ttt_video.cli import main
from ttt_video.errors import UserError
from ttt_video.sample import cogvideox
from ttt_video.sample.cogvideox import Segment, dynamic_guidance, scene_captions
from ttt_video.sample.export import read_video, video_to_uint8

from ..encoders.test_t5 import save_tiny_t5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A CogVideoX pipeline folder with tiny random components: VAE x4 in space and time, patch 2,
    segments of 3 latent frames (sample_frames 9) to keep the test fast."""
    folder = tmp_path_factory.mktemp("cogvideox")
    save_tiny_t5(folder)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9,
        use_rotary_positional_embeddings=True)
    transformer.save_pretrained(folder / "transformer")
    AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
                           block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                           sample_height=64, sample_width=64).save_pretrained(folder / "vae")
    CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          snr_shift_scale=1.0).save_pretrained(folder / "scheduler")
    return folder


def _storyboard(path, n):
    entries = [{"text": "a red cat runs"}, {"text": "the dog jumps", "neg_text": "blue", "transition": True},
               "the cat jumps over the fence"][:n]
    path.write_text(json.dumps(entries))
    return path


def test_generate_end_to_end(model_dir, tmp_path):
    out = tmp_path / "v.mp4"
    result = cogvideox.generate(model_dir, _storyboard(tmp_path / "s.json", 2), seconds=6, out=out, ttt="mlp",
                                steps=2, dynamic_cfg=True, progress=False)
    assert result.video == out and out.is_file() and result.sheet.is_file()
    frames = read_video(out)
    assert result.num_frames == len(frames) == 2 * 8 + 1  # two segments of 3 latent frames sharing one


def test_generator_loads_the_folder_components(model_dir):
    gen = cogvideox.CogVideoXGenerator(model_dir, ttt=None)
    assert isinstance(gen.scheduler, CogVideoXDPMScheduler)
    assert gen.default_size() == (32, 32)
    ddim = cogvideox.CogVideoXGenerator(model_dir, ttt=None, sampler="ddim")
    assert isinstance(ddim.scheduler, CogVideoXDDIMScheduler)
    latents = ddim.sample([Segment("a red cat"), Segment("a dog")], steps=2, progress=False)
    assert latents.shape == (1, 5, 4, 8, 8) and torch.isfinite(latents).all()
    frames = ddim.decode(latents)  # in batches of latent frames
    assert frames.shape == (17, 32, 32, 3)
    whole = ddim.vae.decode(latents.permute(0, 2, 1, 3, 4) / ddim.vae.config.scaling_factor).sample
    assert np.array_equal(frames, video_to_uint8(whole[0].clamp(-1, 1)))
    with pytest.raises(UserError, match="height 36 must be a positive multiple of 8.*32 or 40"):
        gen.sample([Segment("a red cat")], height=36, steps=1, progress=False)
    tiled = cogvideox.CogVideoXGenerator(model_dir, ttt=None, vae_tiling=True)
    # 32 x 32 frames in 2 x 2 tiles; diffusers' tiles must line up with its overlaps, as its defaults do
    tiled.vae.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=20)
    calls = []
    real = tiled.vae.tiled_decode
    tiled.vae.tiled_decode = lambda *a, **k: calls.append(1) or real(*a, **k)
    by_tiles = tiled.decode(latents)
    assert calls and by_tiles.shape == frames.shape
    assert np.abs(by_tiles.astype(int) - frames.astype(int)).mean() < 8  # tiles blended at their overlaps


def test_storyboard_rules(tmp_path):
    segments = cogvideox.read_storyboard(_storyboard(tmp_path / "s.json", 3))
    assert segments[1] == Segment("the dog jumps", "blue", True)
    assert scene_captions(segments) == ["<start_scene> a red cat runs <end_scene>",
                                        "<start_scene> the dog jumps", "the cat jumps over the fence <end_scene>"]
    assert cogvideox.segment_count(segments, 9) == 3
    with pytest.raises(UserError, match="the storyboard has 3 segments but 63 s needs 21"):
        cogvideox.segment_count(segments, 63)
    with pytest.raises(UserError, match="multiple of 3"):
        cogvideox.segment_count(segments, 10)
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "a", "speed": 2}]))
    with pytest.raises(UserError, match="unknown key 'speed'"):
        cogvideox.read_storyboard(tmp_path / "bad.json")
    for entry, what in (({"text": "a", "transition": "no"}, "transition"), ({"text": "a", "neg_text": 5}, "neg_text")):
        (tmp_path / "bad.json").write_text(json.dumps([entry]))
        with pytest.raises(UserError, match=f"segment 1 has a \"{what}\" that is not"):
            cogvideox.read_storyboard(tmp_path / "bad.json")


def test_dynamic_guidance_is_indexed_by_step():
    assert dynamic_guidance(6.0, 0, 50) == 1.0
    assert dynamic_guidance(6.0, 49, 50) == pytest.approx(7.0)
    values = [dynamic_guidance(6.0, i, 50) for i in range(50)]
    assert values == sorted(values)


def test_cli_generate_with_model(model_dir, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    board = _storyboard(tmp_path / "s.json", 1)
    code = main(["generate", "--model", str(model_dir), "--storyboard", str(board), "--seconds", "3",
                 "--steps", "1", "--ttt", "none", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code in (0, None) and out.is_file()
    assert f"video: {out}" in capsys.readouterr().out
    assert main(["generate", "--model", str(model_dir), "--storyboard", str(board), "--seconds", "63",
                 "--out", str(out)]) == 2
    assert "needs 21" in capsys.readouterr().err
    (model_dir / "missing").mkdir(exist_ok=True)
    assert main(["generate", "--model", str(model_dir / "missing"), "--storyboard", str(board),
                 "--out", str(out)]) == 2
    assert "vae/config.json" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["text_encoder/model.safetensors", "tokenizer/tokenizer.json",
                                     "vae/diffusion_pytorch_model.safetensors", "transformer/config.json"])
def test_cli_generate_names_a_missing_file(model_dir, tmp_path, capsys, missing):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / missing).unlink()
    board = _storyboard(tmp_path / "s.json", 1)
    assert main(["generate", "--model", str(folder), "--storyboard", str(board), "--steps", "1",
                 "--out", str(tmp_path / "v.mp4"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing.split("/")[0] in err and missing.split("/")[1] in err, err


def test_cli_generate_checks_the_size_before_loading(model_dir, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("loaded the transformer before checking the size")

    monkeypatch.setattr(cogvideox, "load_transformer", load)
    board = _storyboard(tmp_path / "s.json", 1)
    for flags, message in ((["--height", "36"], "height 36 must be a positive multiple of 8"),
                           (["--width", "0"], "width 0 must be a positive multiple of 8")):
        assert main(["generate", "--model", str(model_dir), "--storyboard", str(board), *flags,
                     "--out", str(tmp_path / "v.mp4")]) == 2
        assert message in capsys.readouterr().err
