"""The CogVideoX VAE as an `external` VAE: the example of the protocol in `vae.py`.

    --vae-module ttt_video.encoders.cogvideox_vae --vae-class CogVideoXVAE
    --vae-init-json '{"path": "CogVideoX-5b/vae"}'

`path` is a local diffusers folder of an `AutoencoderKLCogVideoX` (config.json + weights);
latents are scaled by its config's `scaling_factor` here, so the model sees `z * scaling_factor`.
Video `[B, 3, F, H, W]` in [-1, 1] with F = 1 + 4k; latents `[B, C, 1 + k, H / 8, W / 8]`.
"""

import json
import math
from pathlib import Path

import torch

from ..errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CogVideoXVAE:
    def __init__(self, path, device="cpu", dtype="float32", tiling=False):
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise UserError(f"VAE files missing: {config_file}")
        if json.loads(config_file.read_text()).get("_class_name") != "AutoencoderKLCogVideoX":
            raise UserError(f"{config_file}: not an AutoencoderKLCogVideoX")
        if dtype not in DTYPES:
            raise UserError(f"CogVideoXVAE dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from diffusers import AutoencoderKLCogVideoX

        self.model = AutoencoderKLCogVideoX.from_pretrained(path, local_files_only=True, torch_dtype=DTYPES[dtype])
        self.model.to(device).eval().requires_grad_(False)
        if tiling:  # bounded memory for long or large videos
            self.model.enable_tiling()
        cfg = self.model.config
        self.scaling_factor = cfg.scaling_factor
        self.latent_channels = cfg.latent_channels
        downsamples = len(cfg.block_out_channels) - 1  # the last encoder block keeps its size
        self.temporal_compression = 2 ** min(int(math.log2(cfg.temporal_compression_ratio)), downsamples)
        self.spatial_compression = 2 ** downsamples
        self.device, self.dtype = device, DTYPES[dtype]

    @torch.no_grad()
    def encode(self, video):
        dist = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        return dist.mean * self.scaling_factor, dist.std * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents):
        return self.model.decode(latents.to(self.device, self.dtype) / self.scaling_factor).sample
