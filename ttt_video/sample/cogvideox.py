"""Long videos from CogVideoX with TTT: storyboard -> T5 -> sampler -> VAE -> mp4 + contact sheet.

Everything loads from a local CogVideoX diffusers folder (`transformer/`, `text_encoder/`,
`tokenizer/`, `vae/`, `scheduler/`); a TTT checkpoint (`CogVideoXTTT.save_pretrained`, or a
checkpoint or run folder of `ttt-video train`) replaces its transformer. One storyboard entry per
3 s segment; latents `[B, F, C, h, w]` with F = S * 12 + 1 (neighbouring segments share one
latent frame), decoded to S * 48 + 1 frames.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.manifest import mark_scenes
from ..encoders.pipeline import check_resolution, resolution_factor, spatial_compression
from ..encoders.t5 import T5TextEncoder
from ..errors import UserError
from ..fileio import read_json
from ..models.cogvideox_ttt import (CONFIG_FILE, CogVideoXTTT, diffusers_weight_files, load_config, transformer_folder,
                                    ttt_settings)
from ..train import checkpoint as ckpt
from ..train.adapters import apply_adapter
from .export import contact_sheet, video_to_uint8, write_video

SECONDS_PER_SEGMENT = 3
SAMPLERS = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}


@dataclass
class Segment:
    text: str
    neg_text: str = ""
    transition: bool = False  # a new scene starts at this segment


def read_storyboard(path):
    """A JSON list, one entry per 3 s segment: a caption string or {"text", "neg_text"?, "transition"?}."""
    data = read_json(path, "storyboard", UserError)
    if not isinstance(data, list) or not data:
        raise UserError(f"storyboard {path} must be a non-empty JSON list, one entry per 3 s segment")
    segments = []
    for i, entry in enumerate(data, 1):
        entry = {"text": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or not entry["text"].strip():
            raise UserError(f"storyboard {path}: segment {i} has no \"text\"")
        unknown = sorted(set(entry) - {"text", "neg_text", "transition"})
        if unknown:
            raise UserError(f"storyboard {path}: segment {i} has an unknown key {unknown[0]!r}")
        neg_text, transition = entry.get("neg_text", ""), entry.get("transition", False)
        if not isinstance(neg_text, str):
            raise UserError(f"storyboard {path}: segment {i} has a \"neg_text\" that is not a string")
        if not isinstance(transition, bool):
            raise UserError(f"storyboard {path}: segment {i} has a \"transition\" that is not true or false")
        segments.append(Segment(entry["text"], neg_text, transition))
    return segments


def segment_count(segments, seconds):
    """The storyboard must give exactly one segment per 3 s of video."""
    if seconds is None:
        return len(segments)
    n = seconds / SECONDS_PER_SEGMENT
    if n != int(n) or n < 1:
        raise UserError(f"--seconds must be a positive multiple of {SECONDS_PER_SEGMENT}, got {seconds:g}")
    if int(n) != len(segments):
        raise UserError(f"the storyboard has {len(segments)} segments but {seconds:g} s needs {int(n)} "
                        f"(one per {SECONDS_PER_SEGMENT} s)")
    return int(n)


def scene_captions(segments):
    """Captions with scene delimiters (`mark_scenes`): a segment with "transition" starts a new scene."""
    return mark_scenes([s.text for s in segments], [s.transition for s in segments])


def check_pipeline_folder(folder):
    """The files a CogVideoX diffusers folder needs besides the transformer's (checked when it loads)
    and T5's (checked by `T5TextEncoder`), before anything loads."""
    for sub, marker in (("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / sub / marker).is_file():
            raise UserError(f"model folder {folder} is missing {sub}/{marker}")
    diffusers_weight_files(folder / "vae")


def dynamic_guidance(scale, step, num_steps):
    """CogVideoX's rising guidance, indexed by the step (0 .. num_steps-1), not by the timestep:
    1 at the first step, 1 + scale at the last."""
    progress = step / max(1, num_steps - 1)
    return 1 + scale * (1 - math.cos(math.pi * progress ** 5.0)) / 2


def _from_trainer(path):
    """Whether `path` is a run folder or checkpoint of `ttt-video train` (its config.json is the
    package's config), rather than a `CogVideoXTTT.save_pretrained` folder."""
    if (path / ckpt.LAST).is_file():
        return True
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def load_transformer(model_dir, ttt_checkpoint=None, ttt="mlp", ema=False):
    """The transformer to sample with: the folder's own with fresh TTT layers of kind `ttt` (or
    none), or a trained one. A `ttt-video train` checkpoint holds the whole state dict and the run's
    config; its TTT settings and the folder's transformer config rebuild the model, so the
    checkpoint must come from a transformer of the same dimensions. `ema`: the trained parameters
    from the moving average the run kept (`train.ema_decay`)."""
    if not ttt_checkpoint:
        if ema:
            raise UserError("--ema needs a --ttt-checkpoint from `ttt-video train` (the average is the run's)")
        return CogVideoXTTT.from_diffusers(model_dir, ttt=ttt)
    path = Path(ttt_checkpoint)
    if not _from_trainer(path):
        if ema:
            raise UserError(f"{path} is a saved model, not a `ttt-video train` checkpoint: it keeps no moving "
                            "average for --ema")
        return CogVideoXTTT.from_pretrained(path)
    path = ckpt.resolve(path)
    cfg = ckpt.load_config(path)
    if cfg.model.arch != "cogvideox-ttt":
        raise UserError(f"checkpoint {path} is of model.arch {cfg.model.arch!r}, not cogvideox-ttt")
    if cfg.train.adapter == "lora":
        raise UserError(f"checkpoint {path} holds LoRA weights (train.adapter lora); --ttt-checkpoint takes "
                        "full state dicts")
    model_cfg = load_config(transformer_folder(model_dir) / CONFIG_FILE, **ttt_settings(cfg.model))
    model = CogVideoXTTT.from_weights(model_cfg, path / ckpt.MODEL_FILE)
    if ema:
        ckpt.apply_ema(apply_adapter(model, cfg.train.adapter), path)
    return model


class CogVideoXGenerator:
    def __init__(self, model_dir, ttt_checkpoint=None, ttt="mlp", sampler=None, device="cpu", dtype=torch.float32,
                 vae_tiling=False, ema=False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import diffusers

        folder = Path(model_dir)
        check_pipeline_folder(folder)
        self.model = load_transformer(folder, ttt_checkpoint, ttt, ema)
        self.model.to(device, dtype).eval().requires_grad_(False)
        self.encoder = T5TextEncoder(folder, device=device, dtype=dtype)
        self.vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(folder / "vae", local_files_only=True,
                                                                    torch_dtype=dtype)
        self.vae.to(device).eval().requires_grad_(False)
        if vae_tiling:
            self.vae.enable_tiling()
            self.vae.enable_slicing()
        sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        name = SAMPLERS[sampler] if sampler else sched_cfg.get("_class_name", SAMPLERS["ddim"])
        if name not in SAMPLERS.values():
            raise UserError(f"unsupported scheduler {name!r}; samplers: {', '.join(SAMPLERS)}")
        self.scheduler = getattr(diffusers, name).from_config(sched_cfg)
        self.spatial = spatial_compression(self.vae.config.block_out_channels)
        self.temporal = self.vae.config.temporal_compression_ratio
        self.device, self.dtype = device, dtype

    def default_size(self):
        cfg = self.model.cfg
        return cfg.sample_height * self.spatial, cfg.sample_width * self.spatial

    def _text(self, captions, num_segments):
        emb, _ = self.encoder.encode(captions)
        return emb.view(-1, num_segments, *emb.shape[1:]).to(self.device, self.dtype)  # [B, S, L, D]

    @torch.no_grad()
    def sample(self, segments, height=None, width=None, steps=50, guidance_scale=6.0, dynamic_cfg=False, seed=0,
               progress=True):
        """Latents `[1, S*(n-1)+1, C, h, w]` for the storyboard `segments`."""
        cfg = self.model.cfg
        S = len(segments)
        default_h, default_w = self.default_size()
        height, width = default_h if height is None else height, default_w if width is None else width
        check_resolution(height, width, self.spatial * cfg.patch_size)
        frames = S * (cfg.frames_per_segment - 1) + 1
        cond = self._text(scene_captions(segments), S)
        uncond = self._text([s.neg_text for s in segments], S)
        guided = guidance_scale > 1
        text = torch.cat([uncond, cond]) if guided else cond
        g = torch.Generator().manual_seed(seed)
        shape = (1, frames, cfg.in_channels, height // self.spatial, width // self.spatial)
        latents = (torch.randn(shape, generator=g) * self.scheduler.init_noise_sigma).to(self.device, self.dtype)
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        dpm = type(self.scheduler).__name__ == SAMPLERS["dpm"]
        old_pred = None
        for i, t in enumerate(tqdm(timesteps, desc="sample", disable=not progress, dynamic_ncols=True)):
            x = torch.cat([latents] * 2) if guided else latents
            x = self.scheduler.scale_model_input(x, t)
            pred = self.model(x, text, t.expand(x.shape[0])).float()
            if guided:
                scale = dynamic_guidance(guidance_scale, i, len(timesteps)) if dynamic_cfg else guidance_scale
                uncond_pred, cond_pred = pred.chunk(2)
                pred = uncond_pred + scale * (cond_pred - uncond_pred)
            if dpm:
                prev_t = timesteps[i - 1] if i > 0 else None
                latents, old_pred = self.scheduler.step(pred, old_pred, t, prev_t, latents, generator=g,
                                                        return_dict=False)
            else:
                latents = self.scheduler.step(pred, t, latents, generator=g, return_dict=False)[0]
            latents = latents.to(self.dtype)
        return latents

    @torch.no_grad()
    def decode(self, latents):
        """Latents `[1, F, C, h, w]` -> frames uint8 `[(F-1)*4+1, H, W, 3]`, a few latent frames at a
        time: the batches of diffusers' `AutoencoderKLCogVideoX._decode`, with its causal convolution
        cache carried across, so the output equals `vae.decode` while only one batch is ever held
        in floating point. With `vae_tiling`, diffusers' tiled decoding instead: spatial tiles, each
        over every frame, blended once all are decoded (less decoder memory per step at large
        sizes, the whole video in floating point at the end)."""
        z = latents.permute(0, 2, 1, 3, 4).to(self.dtype) / self.vae.config.scaling_factor  # [1, C, F, h, w]
        if self.vae.use_tiling:
            return video_to_uint8(self.vae.decode(z).sample[0].float().cpu().clamp(-1, 1))
        num_frames, size = z.shape[2], self.vae.num_latent_frames_batch_size
        rest = num_frames % size
        cuts = [0] + [size * (i + 1) + rest for i in range(max(num_frames // size, 1))]
        cuts[-1] = num_frames
        frames, cache = [], None
        for a, b in zip(cuts, cuts[1:]):
            x = z[:, :, a:b]
            if self.vae.post_quant_conv is not None:
                x = self.vae.post_quant_conv(x)
            x, cache = self.vae.decoder(x, conv_cache=cache)
            frames.append(video_to_uint8(x[0].float().cpu().clamp(-1, 1)))
        return np.concatenate(frames)


@dataclass
class Result:
    video: Path
    sheet: Path
    num_frames: int


def generate(model_dir, storyboard, seconds=None, out="outputs/video.mp4", ttt_checkpoint=None, ttt="mlp",
             sampler=None, steps=50, guidance_scale=6.0, dynamic_cfg=False, height=None, width=None, fps=16,
             seed=0, device="cpu", progress=True, vae_tiling=False, ema=False):
    """Sample a storyboard (a list of `Segment`, or a JSON file) and write the mp4 and contact sheet.
    `ema`: sample with the moving average a `ttt-video train` checkpoint keeps."""
    segments = read_storyboard(storyboard) if isinstance(storyboard, (str, Path)) else list(storyboard)
    segment_count(segments, seconds)
    if height is not None or width is not None:  # before minutes of loading; `sample` checks the model's own
        check_pipeline_folder(Path(model_dir))
        factor = resolution_factor(Path(model_dir) / "vae", transformer_folder(model_dir))
        check_resolution(factor if height is None else height, factor if width is None else width, factor)
    gen = CogVideoXGenerator(model_dir, ttt_checkpoint, ttt, sampler, device, vae_tiling=vae_tiling, ema=ema)
    latents = gen.sample(segments, height, width, steps, guidance_scale, dynamic_cfg, seed, progress)
    frames = gen.decode(latents)
    out = Path(out)
    video = write_video(frames, out, fps=fps)
    per_segment = (gen.model.cfg.frames_per_segment - 1) * gen.temporal
    shrink = max(1, frames.shape[1] // 160)  # tiles about 160 pixels high
    tiles = frames[:-1:max(1, per_segment // 8), ::shrink, ::shrink]
    sheet = contact_sheet(tiles, out.with_suffix(".png"), columns=8)  # a row per segment
    return Result(video, sheet, len(frames))
