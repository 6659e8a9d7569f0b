"""The CogVideoX-TTT presets under the trainer, on a tiny random pipeline folder: segments of 9
frames at 8 fps sharing one frame (3 latent frames sharing one, as 49 and 13 in the real model),
32x32 pixels, VAE x4 in space and time, T5 of width 16 with 8 tokens per caption."""

import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from safetensors.torch import load_file, save_file

from ttt_video import config as config_lib
from ttt_video.cli import main
from ttt_video.config import apply_overrides
from ttt_video.data.manifest import mark_scenes
from ttt_video.diffusion.vpred import VPrediction
from ttt_video.encoders.t5 import T5TextEncoder
from ttt_video.errors import UserError
from ttt_video.layers import ttt as ttt_layer
from ttt_video.models import FrameworkCogVideoXTTT, cogvideox_ttt
from ttt_video.presets import get_preset
from ttt_video.sample.cogvideox import load_transformer
from ttt_video.train import trainer
from ttt_video.train.trainer import train

from ..data.videos import write_video
from ..encoders.common import save_tiny_t5

CAPTIONS = [["a red cat runs", "the dog jumps"], ["a blue dog", "the cat jumps over the fence"]]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A CogVideoX pipeline folder of tiny random components; the scheduler has 2B's SNR shift (3.0),
    so a run that uses CogVideoX-5B's default (1.0) would show."""
    folder = tmp_path_factory.mktemp("cogvideox")
    save_tiny_t5(folder)
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9,
        use_rotary_positional_embeddings=True).save_pretrained(folder / "transformer")
    AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
                           block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                           sample_height=64, sample_width=64).save_pretrained(folder / "vae")
    CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                           snr_shift_scale=3.0).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Two 3 s clips at 8 fps: (24 - 1) // 8 = 2 segments each, one caption per segment."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    lines = []
    for i, captions in enumerate(CAPTIONS):
        write_video(root / f"{i}.mp4", rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), 8)
        lines.append(json.dumps({"video": f"{i}.mp4", "captions": captions}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def stage(pipeline, manifest, seconds, segments, *overrides):
    """The preset of a stage, shrunk to the tiny pipeline (`segments` segments per item)."""
    return apply_overrides(get_preset(f"cogvideox-5b-ttt-{seconds}s"), [
        f"model.pretrained={pipeline}", f"data.manifest={manifest}", f"data.num_scenes={segments}",
        "data.fps=8", "data.frames_per_scene=9", "data.height=32", "data.width=32", "data.text_max_length=8",
        "model.ttt_mini_batch_size=16", "train.mixed_precision=no", "train.warmup_steps=1", "train.log_every=1",
        "train.tensorboard=false", "train.max_steps=3", *overrides])


def _losses(run):
    return [json.loads(line)["loss"] for line in open(run / "loss.jsonl")]


@pytest.fixture(scope="module")
def trained(pipeline, manifest, tmp_path_factory):
    """3 steps of the 3 s stage's recipe (all weights) on items of 2 segments; the calls that
    gradient checkpointing makes are counted."""
    calls = []
    real = cogvideox_ttt.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    cogvideox_ttt.checkpoint = counting
    try:
        run = tmp_path_factory.mktemp("run")
        last = train(stage(pipeline, manifest, 3, 2), run, progress=False)
    finally:
        cogvideox_ttt.checkpoint = real
    return run, last, len(calls)


def test_trains_cogvideox_ttt_with_v_prediction(pipeline, trained):
    run, last, checkpointed = trained
    losses = _losses(run)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert checkpointed == 3  # train.grad_checkpointing reached the model: one block, three steps
    cfg = config_lib.load(last / "config.json")
    # the pipeline's T5, VAE and scheduler, recorded in the checkpoint's config
    assert cfg.data.t5_model == str(pipeline) and cfg.data.vae == str(pipeline / "vae")
    assert cfg.diffusion.scheduler == str(pipeline / "scheduler")
    ref = CogVideoXDDIMScheduler.from_pretrained(pipeline / "scheduler")
    torch.testing.assert_close(VPrediction.from_config(cfg.diffusion).alphas_cumprod, ref.alphas_cumprod)
    after = load_file(last / "model.safetensors")
    pretrained = load_file(pipeline / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in ("transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.ff.proj_in.weight",
                 "patch_embed.text_proj.weight", "proj_out.weight"):
        diffusers_name = name.replace(".ff.proj_in.", ".ff.net.0.proj.")
        assert not torch.equal(after[name], pretrained[diffusers_name]), name
    torch.manual_seed(0)  # the trainer's seed: the TTT layers it started from
    start = FrameworkCogVideoXTTT.from_model_config(cfg.model).state_dict()
    ttt = [k for k in after if ".ttt." in k]
    assert ttt and all(not torch.equal(after[k], start[k]) for k in ttt if "gate" in k or k.endswith("w1"))


def test_video_sizes_are_checked_before_loading(pipeline, manifest, tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("built the model before checking the sizes")

    monkeypatch.setattr(trainer, "build_model", load)
    with pytest.raises(UserError, match="data.height 36 must be a positive multiple of 8.*32 or 40"):
        train(stage(pipeline, manifest, 3, 2, "data.height=36"), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="data.buckets entry width 20 must be a positive multiple of 8"):
        train(stage(pipeline, manifest, 3, 2, "data.buckets=32x32,32x20"), tmp_path / "b", progress=False)


def test_caption_dropout_reaches_the_t5_encoder(pipeline, manifest, tmp_path, monkeypatch):
    seen = []
    real = T5TextEncoder.encode

    def spy(self, captions):
        seen.extend(captions)
        return real(self, captions)

    monkeypatch.setattr(T5TextEncoder, "encode", spy)
    train(stage(pipeline, manifest, 3, 2, "train.caption_dropout=0.5", "train.max_steps=6"), tmp_path / "a",
          progress=False)
    dropped = seen.count("")
    assert len(seen) == 12 and 0 < dropped < 12  # 6 items of 2 segments, each caption dropped or kept
    marked = {c for row in CAPTIONS for c in mark_scenes(row, [False] * len(row))}  # the presets' scene markers
    assert set(seen) - {""} <= marked and marked & set(seen)
    seen.clear()
    train(stage(pipeline, manifest, 3, 2, "train.caption_dropout=0", "train.max_steps=2"), tmp_path / "b",
          progress=False)
    assert len(seen) == 4 and "" not in seen


def test_prepared_cache_trains_with_dropped_captions_as_the_empty_caption(pipeline, manifest, tmp_path,
                                                                          monkeypatch):
    shrink = ["--set", f"model.pretrained={pipeline}", "--set", "data.num_scenes=2", "--set", "data.fps=8",
              "--set", "data.frames_per_scene=9", "--set", "data.height=32", "--set", "data.width=32",
              "--set", "data.text_max_length=8"]
    code = main(["prepare", "--preset", "cogvideox-5b-ttt-3s", *shrink, "--manifest", str(manifest),
                 "--out", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"])
    assert code == 0
    shards = load_file(next((tmp_path / "cache").glob("shard-*.safetensors")))
    assert shards["0.mean"].shape == (4, 5, 8, 8)  # VAE latents: 2 segments of 3 latent frames sharing one
    assert shards["0.text"].shape == (2, 8, 16)  # T5: one caption of 8 tokens per segment
    texts = []
    real = FrameworkCogVideoXTTT.forward

    def spy(self, latents, timestep, text, text_mask=None):
        texts.append(text.detach().clone())
        return real(self, latents, timestep, text, text_mask)

    monkeypatch.setattr(FrameworkCogVideoXTTT, "forward", spy)
    cfg = stage(pipeline, manifest, 3, 2, f"data.cache_dir={tmp_path / 'cache'}", "train.caption_dropout=0.5",
                "train.max_steps=6")
    train(cfg, tmp_path / "run", progress=False)
    empty = load_file(tmp_path / "cache" / "empty_text.safetensors")["text"]
    segments = torch.cat(texts).flatten(0, 1)  # [items * 2, L, D]
    dropped = [torch.equal(s, empty) for s in segments]
    assert len(dropped) == 12 and 0 < sum(dropped) < 12


def test_stage_3s_checkpoint_starts_the_next_stage_with_ttt_qkvo(pipeline, manifest, tmp_path):
    first = train(stage(pipeline, manifest, 3, 1, "train.max_steps=2"), tmp_path / "3s", progress=False)
    cfg = stage(pipeline, manifest, 9, 2, f"train.init_from={tmp_path / '3s'}", "train.max_steps=2")
    assert cfg.train.adapter == "ttt-qkvo"
    second = train(cfg, tmp_path / "9s", progress=False)
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert set(before) == set(after)
    attention = (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v.", ".attn1.to_out.")
    trained = {k for k in after if ".ttt." in k or any(m in k for m in attention)}
    assert any("gate_fwd" in k for k in trained) and any(".ttt.w1" in k for k in trained)
    assert {k for k in after if not torch.equal(after[k], before[k])} == trained
    # the trained weights moved a little from stage 1's, not from a fresh initialisation
    assert max((after[k] - before[k]).abs().max().item() for k in trained) < 1e-3
    assert get_preset("cogvideox-5b-ttt-9s").train.init_from == "runs/cogvideox-5b-ttt-3s"


def test_long_stages_recompute_blocks_part_by_part_with_the_same_losses(pipeline, manifest, tmp_path, monkeypatch):
    """From 30 s on the stages offload the blocks' inputs (CUDA only; on the CPU they stay put), at
    63 s they also recompute each block part by part: the losses are those of whole blocks."""
    for seconds, parts, offload in ((9, False, False), (18, False, False), (30, False, True), (63, True, True)):
        t = get_preset(f"cogvideox-5b-ttt-{seconds}s").train
        assert (t.grad_checkpointing, t.checkpoint_parts, t.offload_checkpoints) == (True, parts, offload)
    calls = Counter()
    for module in (cogvideox_ttt, ttt_layer):
        def counting(fn, *args, real=module.checkpoint, **kwargs):
            calls[getattr(fn, "__name__", type(fn).__name__)] += 1
            return real(fn, *args, **kwargs)
        monkeypatch.setattr(module, "checkpoint", counting)
    runs = {}
    for name, parts in (("parts", "true"), ("whole", "false")):
        cfg = stage(pipeline, manifest, 63, 2, "train.init_from=", "train.max_steps=2",
                    f"train.checkpoint_parts={parts}", f"train.offload_checkpoints={parts}")
        train(cfg, tmp_path / name, progress=False)
        runs[name] = _losses(tmp_path / name)
        if name == "parts":  # per step, in the forward and again in the recompute: 2 segments, the first pass
            assert calls == {"Block": 2, "_attend": 8, "_gated_pass": 4, "_frames_feed_forward": 8}, calls
    assert runs["parts"] == pytest.approx(runs["whole"], rel=1e-5)


def test_ttt_checkpoint_ema_gives_the_moving_average(pipeline, trained, tmp_path):
    """`--ema` with a trainer checkpoint: the trained parameters (the run's adapter: all of them at
    3 s) come from its ema.safetensors, the rest from its weights; a checkpoint without one, or a
    saved model, is refused."""
    _, last, _ = trained
    with pytest.raises(UserError, match="has no ema.safetensors"):
        load_transformer(pipeline, last, ema=True)
    copy = tmp_path / "checkpoint-3"
    shutil.copytree(last, copy)
    weights = load_file(copy / "model.safetensors")
    averaged = {k: torch.full_like(v, 0.25) for k, v in weights.items()}
    save_file(averaged, copy / "ema.safetensors")
    model = load_transformer(pipeline, copy, ema=True)
    assert all(torch.equal(p, averaged[n]) for n, p in model.named_parameters())
    saved = tmp_path / "saved"
    load_transformer(pipeline, copy).save_pretrained(saved)
    with pytest.raises(UserError, match="saved model, not a `ttt-video train` checkpoint"):
        load_transformer(pipeline, saved, ema=True)


def test_generate_samples_a_trainer_checkpoint(pipeline, trained, tmp_path, capsys):
    run, last, _ = trained
    model = load_transformer(pipeline, run)  # a run folder: its last checkpoint
    weights = load_file(last / "model.safetensors")
    assert set(model.state_dict()) == set(weights)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    board = tmp_path / "story.json"
    board.write_text(json.dumps(["a red cat runs", {"text": "the dog jumps", "transition": True}]))
    out = tmp_path / "v.mp4"
    code = main(["generate", "--model", str(pipeline), "--ttt-checkpoint", str(last), "--storyboard", str(board),
                 "--seconds", "6", "--steps", "2", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0 and out.is_file()
    assert f"video: {out}" in capsys.readouterr().out
    assert main(["generate", "a red cat", "--checkpoint", str(run), "--out", str(out), "--no-progress"]) == 2
    assert "--model PIPELINE --ttt-checkpoint CHECKPOINT" in capsys.readouterr().err
