"""Named recipes: each a function returning a full `Config`."""

from functools import partial

from .config import Config, ConfigError


def shapes_tiny():
    """The demo recipe: a ~2M-parameter TTT-MLP video DiT on synthetic shape storyboards, 32x32 pixels,
    3 scenes of 8 frames (one segment each), MiniLM captions. Runs on a CPU. The other tiny presets
    are this recipe with another `model.arch`."""
    cfg = Config()
    cfg.train.max_steps = 2500
    cfg.train.batch_size = 32
    cfg.train.warmup_steps = 100
    return cfg


def sora_tiny():
    """A from-scratch video DiT (factorised space-time attention, cross-attention to each segment's
    caption) on the shapes-tiny data and schedule: 32x32 pixels, 3 scenes of 8 frames."""
    cfg = shapes_tiny()
    cfg.model.arch, cfg.model.attention_type = "sora-dit", "st"
    return cfg


def titans_tiny():
    """A video DiT whose context across segments is a Titans neural memory per block (8 memory
    tokens, 4 persistent tokens) on the shapes-tiny data and schedule: 32x32 pixels, 3 scenes of 8 frames.
    The bundled model is this preset with `model.mlp_ratio=4.453125`, `train.max_steps=1000` and
    `train.seed=2` (README, "The bundled model")."""
    cfg = shapes_tiny()
    cfg.model.arch = "titans-dit"
    cfg.model.num_memory_tokens, cfg.model.num_persistent_tokens, cfg.model.memory_chunk_size = 8, 4, 64
    return cfg


CONTEXT_STAGES = (3, 9, 18, 30, 63)  # seconds of video per training stage, 3 s per segment


def _cogvideox_ttt(segments, frames_per_segment, fps, height, width):
    """What every CogVideoX-TTT recipe shares: TTT-MLP layers, manifest data in `segments` segments
    of `frames_per_segment` frames plus the one shared with the next, the pipeline's T5 (226
    tokens per segment) and VAE, v-prediction, one video per micro-batch in bf16 with gradient
    checkpointing, and TTT-Video's optimiser settings."""
    cfg = Config()
    m, d, diff, t = cfg.model, cfg.data, cfg.diffusion, cfg.train
    m.arch, m.seq_mixer, m.ttt_mini_batch_size, m.gate_init = "cogvideox-ttt", "ttt-mlp", 64, 0.1
    d.source, d.num_scenes, d.fps, d.height, d.width = "manifest", segments, fps, height, width
    d.frames_per_scene, d.segment_overlap = frames_per_segment + 1, 1  # neighbouring segments share a frame
    d.text_encoder, d.text_max_length, d.vae = "t5", 226, ""  # T5 and VAE: the pipeline's
    d.scene_markers = True  # captions as `ttt-video generate --model` writes them
    diff.objective, diff.steps, diff.guidance_scale = "v-prediction", 50, 6.0
    t.weight_decay, t.grad_clip, t.warmup_steps, t.caption_dropout = 1e-4, 0.1, 100, 0.1
    t.batch_size, t.mixed_precision, t.grad_checkpointing = 1, "bf16", True
    t.save_every = 250
    return cfg


def cogvideox_5b_ttt(seconds):
    """TTT-Video's multi-stage context extension of CogVideoX-5B (480x720, 16 fps, 3 s segments of
    49 frames sharing one frame with each neighbour, i.e. 13 latent frames sharing one; 226 T5
    tokens per segment; v-prediction). Set `model.pretrained` to the local diffusers CogVideoX
    pipeline folder: the model's dimensions come from its transformer config (a 2B folder works
    too), and its T5, VAE and scheduler are used unless `data.t5_model`, `data.vae` or
    `diffusion.scheduler` name others. Data: `data.manifest` (+ `data.data_root`) or a
    `ttt-video prepare` cache in `data.cache_dir`.
    The 3 s stage fine-tunes everything (TTT at 1e-4, the pretrained weights at 1e-5); each later
    stage starts from the previous stage's checkpoint (`train.init_from`, by default the previous
    preset's default run folder `runs/cogvideox-5b-ttt-<previous>s`) and trains the TTT layers,
    their gates and the attention q/k/v/o at 1e-5. From 30 s on the blocks' inputs wait for backward in
    host memory (`train.offload_checkpoints`), at 63 s each block is also recomputed part by part
    (`train.checkpoint_parts`). `max_steps` is a starting point, not a recipe constant: set it
    for your data."""
    if seconds not in CONTEXT_STAGES:
        raise ConfigError(f"no CogVideoX-TTT stage of {seconds} s; stages: {', '.join(map(str, CONTEXT_STAGES))}")
    cfg = _cogvideox_ttt(seconds // 3, 48, 16, 480, 720)
    t = cfg.train
    stage = CONTEXT_STAGES.index(seconds)
    t.adapter = "full" if stage == 0 else "ttt-qkvo"
    t.init_from = "" if stage == 0 else f"runs/cogvideox-5b-ttt-{CONTEXT_STAGES[stage - 1]}s"
    t.lr = 1e-5
    t.ttt_lr = 1e-4 if stage == 0 else 1e-5
    t.max_steps = 5000 if stage == 0 else 1000
    # the cheapest recompute with which the stage fits one 141 GB GPU (README, "CogVideoX with TTT")
    t.offload_checkpoints, t.checkpoint_parts = seconds >= 30, seconds >= 63
    return cfg


def svd_finetune(num_frames):
    """Fine-tunes Stable Video Diffusion (image-to-video) on a manifest of your clips: 14 frames
    (`stable-video-diffusion-img2vid`) or 25 (`-xt`) at 7 fps, in 576x1024, 1024x576 and 768x768
    buckets, each item conditioned on its first frame (or its manifest `cond_image`). Set
    `model.pretrained` to the local diffusers pipeline folder, `data.vae` to its `vae/`, and the
    manifest. EDM training (ln sigma ~ N(0.7, 1.6^2)) of the UNet's temporal layers at 1e-5 in bf16
    with gradient checkpointing; `train.adapter=full` trains the spatial layers too. 10% of items
    drop the image (the unconditional input of the guidance, 1 on the first frame rising to 3 on
    the last). `max_steps` is a starting point: set it for your data."""
    cfg = Config()
    m, d, diff, t = cfg.model, cfg.data, cfg.diffusion, cfg.train
    m.arch, m.in_channels, m.condition_frames = "svd", 4, 1
    d.source, d.num_scenes, d.frames_per_scene, d.fps = "manifest", 1, num_frames, 7
    d.height, d.width, d.buckets, d.i2v_ratio = 576, 1024, "576x1024,1024x576,768x768", 1.0
    m.fps_id, m.motion_bucket_id, m.noise_aug_strength = d.fps - 1, 127, 0.02
    diff.objective, diff.steps, diff.min_guidance_scale, diff.guidance_scale = "edm", 25, 1.0, 3.0
    diff.p_mean, diff.p_std, diff.sigma_min, diff.sigma_max = 0.7, 1.6, 0.002, 700.0
    t.adapter, t.lr, t.lr_schedule, t.warmup_steps, t.weight_decay = "temporal", 1e-5, "constant", 100, 0.0
    t.batch_size, t.mixed_precision, t.grad_checkpointing, t.caption_dropout = 1, "bf16", True, 0.1
    t.max_steps, t.save_every = 5000, 500
    return cfg


# seconds: (segments, frames per segment at 8 fps, height, width)
RTX4090_SECONDS = {3: (1, 24, 480, 720), 5: (2, 20, 480, 720), 10: (4, 20, 352, 528)}


def rtx4090(seconds):
    """A TTT fine-tune of CogVideoX-2B that fits a 24 GB GPU (RTX 4090 class) at the 2B's native
    8 fps: videos of 3 or 5 s at 480x720 and of 10 s at 352x528 (the same 2:3 frame, 0.54 of the
    tokens), in segments of about 3 s (3 s does not divide 5 or 10, so those use 2.5 s), 226 T5
    tokens per segment. The pretrained transformer stays frozen, stored in bf16; the new TTT layers
    and their gates train (`ttt-only`, float32 weights and AdamW state) in bf16 autocast with
    gradient checkpointing, one video per micro-batch and 4 accumulated per step.
    `ttt-video plan --preset rtx4090-10s --gpu-memory 24GB` shows the budget. Set `model.pretrained`
    to the local diffusers CogVideoX-2B folder; precompute text embeddings so the T5 encoder is not
    loaded beside it."""
    if seconds not in RTX4090_SECONDS:
        raise ConfigError(f"no 24 GB preset of {seconds} s; lengths: {', '.join(map(str, RTX4090_SECONDS))}")
    segments, frames, height, width = RTX4090_SECONDS[seconds]
    cfg = _cogvideox_ttt(segments, frames, 8, height, width)
    cfg.model.segment_frames = frames // 4 + 1  # the VAE keeps one latent frame per 4 frames, plus the shared one
    t = cfg.train
    t.adapter, t.frozen_dtype, t.lr, t.ttt_lr = "ttt-only", "bfloat16", 1e-4, 1e-4
    t.grad_accum_steps, t.max_steps = 4, 2000
    return cfg


PRESETS = {
    "shapes-tiny": shapes_tiny,
    "sora-tiny": sora_tiny,
    "titans-tiny": titans_tiny,
    **{f"cogvideox-5b-ttt-{s}s": partial(cogvideox_5b_ttt, s) for s in CONTEXT_STAGES},
    "svd-finetune": partial(svd_finetune, 14),
    "svd-xt-finetune": partial(svd_finetune, 25),
    **{f"rtx4090-{s}s": partial(rtx4090, s) for s in RTX4090_SECONDS},
}


def get_preset(name):
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None
