"""VAEs: videos float `[B, 3, F, H, W]` in [-1, 1] <-> latents `[B, C, f, h, w]`.

`encode` returns the posterior's mean and std, already in the model's latent units
((z - shift_factor) * scaling_factor), so a latent sample is mean + std * noise; caches store
both and draw the sample at training time.

- `identity`: latents are the pixels (mean = x, std = 0); the tiny models train on pixels.
- a local diffusers folder (config.json + weights): `AutoencoderKL` (2D, applied frame by frame),
  `AutoencoderKLTemporalDecoder` (Stable Video Diffusion's: encodes frame by frame, decodes
  chunks of consecutive frames of one video together) or `AutoencoderKLCogVideoX` (3D,
  compresses time), chosen by the config's `_class_name`.
- `external`: any class following the protocol below, built as `Class(**init)` from its import
  path (`data.vae_module`, `data.vae_class`) and `data.vae_init_json` (a JSON object, inline or a
  file's path); `cogvideox_vae.CogVideoXVAE` is the example (docs/vae.md).

The protocol every VAE here follows:
    encode(video [B, 3, F, H, W] in [-1, 1]) -> (mean, std), each [B, C, f, h, w] in latent units
    decode(latents [B, C, f, h, w]) -> video [B, 3, F, H, W] in [-1, 1]
    latent_channels (C), temporal_compression (F -> f), spatial_compression (H -> h, W -> w)
Scaling (and any shift) happens inside `encode` and `decode`: the model sees exactly what
`encode` returns. An external class whose `__init__` takes `device` gets the run's device
unless the JSON sets it.
"""

import importlib
import inspect
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLTemporalDecoder", "AutoencoderKLCogVideoX")


def item_generator(seed):
    """A generator for one item's latent sample; `seed` is an int or a list of ints, e.g.
    [run seed, draw index]. The cache and on-the-fly encoding use the same one."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))


PROTOCOL = ("encode", "decode", "latent_channels", "temporal_compression", "spatial_compression")


class IdentityVAE:
    latent_channels = 3
    temporal_compression = spatial_compression = 1

    def encode(self, video):
        return video, torch.zeros_like(video)

    def decode(self, latents):
        return latents

    def sample(self, video, seeds):
        return video


class DiffusersVAE:
    def __init__(self, path, device="cpu", dtype=torch.float32, frames_per_chunk=16):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"VAE files missing: {config_file}")
        name = json.loads(config_file.read_text()).get("_class_name")
        if name not in VAE_CLASSES:
            raise UserError(f"{config_file}: unsupported VAE class {name!r}; supported: {', '.join(VAE_CLASSES)}")
        import diffusers

        self.model = getattr(diffusers, name).from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.temporal = name == "AutoencoderKLCogVideoX"
        self.temporal_decoder = name == "AutoencoderKLTemporalDecoder"
        cfg = self.model.config
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.get("shift_factor") or 0.0
        self.latent_channels = cfg.latent_channels
        downsamples = len(cfg.block_out_channels) - 1  # the last encoder block keeps its size
        self.temporal_compression = 1
        if self.temporal:
            self.temporal_compression = 2 ** min(int(math.log2(cfg.temporal_compression_ratio)), downsamples)
        self.spatial_compression = 2 ** downsamples
        self.device, self.dtype = device, dtype
        self.frames_per_chunk = frames_per_chunk

    def _frames(self, fn, x):
        """Apply a 2D `fn` to every frame of `[B, C, F, H, W]`, a chunk of frames at a time."""
        B, F = x.shape[0], x.shape[2]
        flat = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*F, C, H, W]
        outs = [fn(flat[i:i + self.frames_per_chunk]) for i in range(0, flat.shape[0], self.frames_per_chunk)]
        return [torch.cat(o).unflatten(0, (B, F)).permute(0, 2, 1, 3, 4) for o in zip(*outs)]

    @torch.no_grad()
    def encode(self, video):
        video = video.to(self.device, self.dtype)
        if self.temporal:
            dist = self.model.encode(video).latent_dist
            mean, std = dist.mean, dist.std
        else:
            def encode_frames(frames):
                dist = self.model.encode(frames).latent_dist
                return dist.mean, dist.std

            mean, std = self._frames(encode_frames, video)
        return ((mean - self.shift_factor) * self.scaling_factor).float(), (std * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents):
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        if self.temporal:
            return self.model.decode(z).sample.float()
        if self.temporal_decoder:  # its decoder mixes the frames of a chunk, so a chunk is one video's
            videos = [torch.cat([self.model.decode(chunk, num_frames=chunk.shape[0]).sample
                                 for chunk in video.transpose(0, 1).split(self.frames_per_chunk)])  # [F, 3, H, W]
                      for video in z]
            return torch.stack(videos).transpose(1, 2).float()
        return self._frames(lambda f: (self.model.decode(f).sample,), z)[0].float()

    def sample(self, video, seeds):
        """A posterior sample per video; item b's noise comes from `item_generator(seeds[b])`."""
        return posterior_sample(self.encode(video), seeds)


def posterior_sample(posterior, seeds):
    mean, std = posterior
    noise = torch.stack([torch.randn(mean.shape[1:], generator=item_generator(s)) for s in seeds])
    return mean + std * noise.to(mean.device)


def _init_kwargs(init_json):
    """`init_json`: a JSON object inline, or the path of a file holding one; empty: no arguments."""
    if not init_json.strip():
        return {}
    text = init_json
    if not init_json.lstrip().startswith("{"):
        if not Path(init_json).is_file():
            raise UserError(f"data.vae_init_json is neither a JSON object nor a file: {init_json}")
        text = Path(init_json).read_text()
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"data.vae_init_json is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UserError("data.vae_init_json must be a JSON object of keyword arguments")
    return kwargs


class ExternalVAE:
    """An object following the module's protocol, built from its import path."""

    def __init__(self, module, cls, init_json="", device="cpu"):
        if not module or not cls:
            raise UserError("data.vae 'external' needs data.vae_module and data.vae_class")
        try:
            factory = getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise UserError(f"cannot import VAE module {module}: {e}") from None
        except AttributeError:
            raise UserError(f"VAE module {module} has no class {cls}") from None
        kwargs = _init_kwargs(init_json)
        try:
            if "device" in inspect.signature(factory).parameters:
                kwargs.setdefault("device", device)
        except (TypeError, ValueError):
            pass
        try:
            self.adapter = factory(**kwargs)
        except TypeError as e:
            raise UserError(f"{module}.{cls}: {e}") from None
        missing = [name for name in PROTOCOL if not hasattr(self.adapter, name)]
        if missing:
            raise UserError(f"{module}.{cls} does not follow the VAE protocol: no {missing[0]}")
        self.latent_channels = int(self.adapter.latent_channels)
        self.temporal_compression = int(self.adapter.temporal_compression)
        self.spatial_compression = int(self.adapter.spatial_compression)

    @torch.no_grad()
    def encode(self, video):
        mean, std = self.adapter.encode(video)
        return mean.float(), std.float()

    @torch.no_grad()
    def decode(self, latents):
        return self.adapter.decode(latents).float()

    def sample(self, video, seeds):
        """A posterior sample per video; item b's noise comes from `item_generator(seeds[b])`."""
        return posterior_sample(self.encode(video), seeds)


def build_vae(name, device="cpu", module="", cls="", init_json=""):
    """`identity`, a local diffusers VAE folder, or `external` (`module.cls(**init_json)`)."""
    if name == "identity":
        return IdentityVAE()
    if name == "external":
        return ExternalVAE(module, cls, init_json, device)
    if not Path(name).is_dir():
        raise UserError(f"VAE folder not found: {name} "
                        "(data.vae is 'identity', a local diffusers VAE folder or 'external')")
    return DiffusersVAE(name, device)


def vae_from_config(data_cfg, device="cpu"):
    return build_vae(data_cfg.vae, device, data_cfg.vae_module, data_cfg.vae_class, data_cfg.vae_init_json)
