"""VAEs: videos float `[B, 3, F, H, W]` in [-1, 1] <-> latents `[B, C, f, h, w]`.

`encode` returns the posterior's mean and std, already in the model's latent units
((z - shift_factor) * scaling_factor), so a latent sample is mean + std * noise; caches store
both and draw the sample at training time.

- `identity`: latents are the pixels (mean = x, std = 0); the tiny models train on pixels.
- a local diffusers folder (config.json + weights): `AutoencoderKL` (2D, applied frame by frame)
  or `AutoencoderKLCogVideoX` (3D, compresses time), chosen by the config's `_class_name`.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLCogVideoX")


def item_generator(seed):
    """A generator for one item's latent sample; `seed` is an int or a list of ints, e.g.
    [run seed, draw index]. The cache and on-the-fly encoding use the same one."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))


class IdentityVAE:
    latent_channels = 3

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
        cfg = self.model.config
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor or 0.0
        self.latent_channels = cfg.latent_channels
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
        return self._frames(lambda f: (self.model.decode(f).sample,), z)[0].float()

    def sample(self, video, seeds):
        """A posterior sample per video; item b's noise comes from `item_generator(seeds[b])`."""
        mean, std = self.encode(video)
        noise = torch.stack([torch.randn(mean.shape[1:], generator=item_generator(s)) for s in seeds])
        return mean + std * noise.to(mean.device)


def build_vae(name, device="cpu"):
    """`identity`, or a local diffusers VAE folder."""
    if name == "identity":
        return IdentityVAE()
    if not Path(name).is_dir():
        raise UserError(f"VAE folder not found: {name} (data.vae is 'identity' or a local diffusers VAE folder)")
    return DiffusersVAE(name, device)
