"""Typed nested configuration: dataclasses, `--set a.b=c` overrides, JSON load/save.

The resolved config is saved beside every checkpoint, so a checkpoint alone rebuilds its model.
"""

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field

from .errors import UserError
from .fileio import read_json, write_text_atomic


class ConfigError(UserError):
    """A user's mistake in a config value or override."""


@dataclass
class ModelConfig:
    arch: str = "tiny-dit"
    in_channels: int = 3
    patch_size: tuple[int, int, int] = (2, 4, 4)  # (t, h, w)
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384
    seq_mixer: str = "ttt-mlp"  # attention | swa | ttt-linear | ttt-mlp
    swa_window: int = 272  # seq_mixer swa: tokens each side (272: one shapes-tiny segment)
    ttt_mini_batch_size: int = 64
    ttt_base_lr: float = 1.0
    gate_init: float = 0.1
    ttt_impl: str = "auto"  # auto | torch | triton | reference
    pretrained: str = ""  # arch "cogvideox-ttt": a local diffusers CogVideoX (transformer) folder;
    # arch "svd": a local diffusers Stable Video Diffusion pipeline folder (or its unet/)
    segment_frames: int = 0  # arch "cogvideox-ttt": latent frames per segment; 0: the pretrained config's (13)
    attention_type: str = "st"  # arch "sora-dit": st (space, then time) | full (3D)
    num_persistent_tokens: int = 4  # arch "titans-dit": learned tokens every block attends to
    num_memory_tokens: int = 8  # arch "titans-dit": tokens read from each block's memory per segment
    memory_chunk_size: int = 64  # arch "titans-dit": tokens per chunk of a memory update
    condition_frames: int = 0  # 1: the first latent frame is an image condition (i2v; not cogvideox-ttt)
    fps_id: int = 6  # arch "svd": the fps micro-condition (SVD was trained with the clip's fps - 1)
    motion_bucket_id: int = 127  # arch "svd": the motion micro-condition (higher: more motion)
    noise_aug_strength: float = 0.02  # arch "svd": noise added to the condition image, also a micro-condition


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | manifest
    num_scenes: int = 3
    frames_per_scene: int = 8  # one segment per scene
    segment_overlap: int = 0  # frames neighbouring segments share (CogVideoX: 1; 49-frame segments, 48 S + 1 frames)
    height: int = 32
    width: int = 32
    fps: int = 8
    seed: int = 0
    text_max_length: int = 16
    text_encoder: str = "minilm"  # minilm | t5 | llm | t5+llm (T5 or UMT5 tokens, then LLM tokens)
    t5_model: str = ""  # text_encoder t5, t5+llm: a local T5/UMT5 folder (or CogVideoX pipeline folder)
    llm_model: str = ""  # text_encoder llm, t5+llm: a local folder transformers' AutoModel loads
    llm_dtype: str = "float32"  # float32 | float16 | bfloat16
    llm_max_length: int = 64  # LLM tokens per caption
    llm_hidden_size: int = 0  # 0: read from the LLM's config.json
    data_root: str = ""  # manifest paths are relative to this folder
    manifest: str = ""  # a .jsonl manifest or a metadata.json list (source "manifest")
    buckets: str = ""  # resolution buckets "HxW,HxW,..."; empty: height x width only
    i2v_ratio: float = 0.0  # share of items whose first frame (or cond_image) is a condition
    strict: bool = False  # bad data is an error instead of skipped and counted
    scene_markers: bool = False  # <start_scene> / <end_scene> around each item's scenes (manifest "transitions")
    cache_dir: str = ""  # read latents and text embeddings from `ttt-video prepare` output
    vae: str = "identity"  # identity | a local diffusers VAE folder | external
    vae_module: str = ""  # vae "external": import path of the adapter module (docs/vae.md)
    vae_class: str = ""  # vae "external": the adapter class in that module
    vae_init_json: str = ""  # vae "external": JSON object of the class's keyword arguments


@dataclass
class DiffusionConfig:
    objective: str = "flow"  # flow | v-prediction (CogVideoX's DDPM, diffusion/vpred.py) | edm (SVD)
    scheduler: str = ""  # v-prediction: a diffusers scheduler_config.json or its folder; empty: the one of
    # the pipeline model.pretrained lies in, else CogVideoX-5B's values
    timestep_shift: float = 1.0
    steps: int = 20
    guidance_scale: float = 4.0  # objective "edm": the last frame's scale
    min_guidance_scale: float = 1.0  # objective "edm": the first frame's scale (rising linearly to guidance_scale)
    p_mean: float = 0.7  # objective "edm": training ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.6
    sigma_min: float = 0.002  # objective "edm": the sampler's Karras schedule
    sigma_max: float = 700.0


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    log_every: int = 10
    save_every: int = 500
    save_limit: int = 2
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0  # 0: torch's default
    num_workers: int = 0  # data-loading processes
    grad_accum_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 with loss scaling)
    grad_checkpointing: bool = False
    checkpoint_parts: bool = False  # cogvideox-ttt, with grad_checkpointing: recompute blocks part by part
    offload_checkpoints: bool = False  # cogvideox-ttt, with grad_checkpointing: block inputs in host memory
    lr_schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    ttt_lr: float = 0.0  # learning rate of TTT parameters; 0: same as lr
    adapter: str = "full"  # full | qkvo | ttt-only | lora
    frozen_dtype: str = "float32"  # float32 | bfloat16 | float16: storage of the weight matrices the adapter freezes
    init_from: str = ""  # start from this checkpoint's model weights (a new run, not a resume)
    lora_rank: int = 8
    lora_alpha: float = 8.0
    ema_decay: float = 0.0  # 0: no EMA
    validate_every: int = 0  # 0: no validation samples
    validation_videos: int = 2
    tensorboard: bool = True
    wandb_project: str = ""  # non-empty: also log to this Weights & Biases project (the wandb extra)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def _convert(value, tp, name):
    origin = typing.get_origin(tp)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(tp)
        if len(items) != len(args):
            raise ConfigError(f"{name} needs {len(args)} comma-separated values, got {value!r}")
        return tuple(_convert(v, t, name) for v, t in zip(items, args))
    if origin in (typing.Union, types.UnionType):
        if value in (None, "none", "None", "null"):
            return None
        return _convert(value, [a for a in typing.get_args(tp) if a is not type(None)][0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {tp.__name__}, got {value!r}") from None


def from_dict(cls, data, prefix=""):
    """Build dataclass `cls` from a nested dict; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {prefix.rstrip('.') or 'file'} must be a JSON object of keys, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{sorted(unknown)[0]}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(value, tp, prefix + name)
    return cls(**kwargs)


def apply_overrides(cfg, overrides):
    """Apply `a.b=c` strings to a config in place; returns it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        *path, last = key.strip().split(".")
        node = cfg
        for part in path:
            if not dataclasses.is_dataclass(node) or not hasattr(node, part):
                raise ConfigError(f"unknown config key {key}")
            node = getattr(node, part)
        if not dataclasses.is_dataclass(node) or last not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"unknown config key {key}")
        setattr(node, last, _convert(value.strip(), typing.get_type_hints(type(node))[last], key))
    return cfg


CHOICES = {"train.mixed_precision": ("no", "bf16", "fp16"), "train.lr_schedule": ("cosine", "constant"),
           "data.source": ("synthetic", "manifest"), "data.text_encoder": ("minilm", "t5", "llm", "t5+llm")}


def validate(cfg):
    """Refuse values no run can use, before anything loads (`ConfigError` naming the key); the
    model-, objective- and adapter-specific names are checked where they are built."""
    t, d, m = cfg.train, cfg.data, cfg.model
    ranges = [("train.max_steps", t.max_steps, 1, None), ("train.batch_size", t.batch_size, 1, None),
              ("train.grad_accum_steps", t.grad_accum_steps, 1, None), ("train.log_every", t.log_every, 1, None),
              ("train.save_every", t.save_every, 1, None), ("train.validation_videos", t.validation_videos, 1, None),
              ("train.warmup_steps", t.warmup_steps, 0, None), ("train.lr", t.lr, 0, None),
              ("train.ttt_lr", t.ttt_lr, 0, None), ("train.weight_decay", t.weight_decay, 0, None),
              ("train.grad_clip", t.grad_clip, 0, None), ("train.min_lr_ratio", t.min_lr_ratio, 0, 1),
              ("train.caption_dropout", t.caption_dropout, 0, 1), ("data.i2v_ratio", d.i2v_ratio, 0, 1),
              ("data.height", d.height, 1, None), ("data.width", d.width, 1, None), ("data.fps", d.fps, 1, None),
              ("data.num_scenes", d.num_scenes, 1, None), ("data.frames_per_scene", d.frames_per_scene, 1, None),
              ("data.text_max_length", d.text_max_length, 1, None), ("model.num_heads", m.num_heads, 1, None)]
    for key, value, low, high in ranges:
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{key} must be {span}, got {value}")
    if t.lr == 0:
        raise ConfigError("train.lr must be above 0, got 0")
    if m.dim % m.num_heads:
        raise ConfigError(f"model.num_heads must divide model.dim ({m.dim}), got {m.num_heads}")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key in ("checkpoint_parts", "offload_checkpoints"):
        if getattr(t, key) and not t.grad_checkpointing:
            raise ConfigError(f"train.{key} refines gradient checkpointing: set train.grad_checkpointing=true too")
        if getattr(t, key) and m.arch != "cogvideox-ttt":
            raise ConfigError(f"train.{key} works with model.arch=cogvideox-ttt, got {m.arch!r}")
    check_device(t.device, "train.device")
    return cfg


def check_device(name, key):
    """Refuse a device name no run can use (`ConfigError` naming `key`); whether this machine has
    the device is checked where the device is used (`train.trainer.resolve_device`), so a config
    stays valid on another machine."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")


def check_recorded(recorded, settings, what, remedy):
    """Refuse `what` (a cache) made with other settings than `settings` ({key: value} from the
    config), naming the first that differs; a key recorded on one side only differs too."""
    for key in dict.fromkeys([*settings, *recorded]):
        if recorded.get(key) != settings.get(key):
            raise ConfigError(f"{what} was made with {key}={recorded.get(key)!r}, the config has "
                              f"{settings.get(key)!r}; {remedy}")


def save(cfg, path):
    write_text_atomic(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def load(path):
    return from_dict(Config, read_json(path, "config file", ConfigError))
