"""Stable Video Diffusion: diffusers' `UNetSpatioTemporalConditionModel` (image-to-video) behind
the framework's model call, so the trainer, the EDM objective and `generate` drive it like any
other architecture.

SVD has no captions: its one "text" token per video is the CLIP image embedding of the
condition frame (`encoders.svd_image`), zero for the unconditional input. The condition latents
arrive in the framework's layout (`condition_input`: latents at frame 0 and a mask channel) and
are repeated to every frame and concatenated to the noisy latents' channels, as SVD was trained;
the mask channel is dropped, since SVD marks a missing condition by zero latents. The fps, motion
and noise-augmentation micro-conditions (`added_time_ids`) come from the model config. The input
scaling c_in belongs to the objective (`diffusion.edm`), so this is a plain call of the UNet.

Layout: latents `[B, C, F, h, w]` here, `[B, F, C, h, w]` inside diffusers; text `[B, 1, 1, D]`;
cond `[B, C + 1, F, h, w]`.
"""

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

UNET_CLASS = "UNetSpatioTemporalConditionModel"


def unet_folder(pretrained):
    """The UNet folder of `model.pretrained`: a pipeline folder's `unet/`, or the folder itself."""
    if not pretrained:
        raise UserError("arch svd needs model.pretrained: a local Stable Video Diffusion pipeline folder")
    path = Path(pretrained)
    for folder in (path / "unet", path):
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == UNET_CLASS:
            return folder
    raise UserError(f"no {UNET_CLASS} in {path} (expected {path / 'unet' / 'config.json'})")


def pipeline_folder(pretrained):
    """The pipeline folder (image_encoder/, vae/, ...) of `model.pretrained`: the UNet folder's parent."""
    return unet_folder(pretrained).parent


class SVD(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from diffusers import UNetSpatioTemporalConditionModel

        if cfg.condition_frames != 1:
            raise ValueError("arch svd is image-to-video only: set model.condition_frames=1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = cfg
        self.unet = UNetSpatioTemporalConditionModel.from_pretrained(unet_folder(cfg.pretrained),
                                                                     local_files_only=True)
        channels = self.unet.config.out_channels
        if cfg.in_channels != channels or self.unet.config.in_channels != 2 * channels:
            raise UserError(f"model.in_channels is {cfg.in_channels}, the SVD UNet predicts {channels} "
                            f"channels from {self.unet.config.in_channels}; set model.in_channels={channels}")

    def enable_gradient_checkpointing(self, enabled=True):
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def added_time_ids(self, batch, device, dtype):
        ids = [self.cfg.fps_id, self.cfg.motion_bucket_id, self.cfg.noise_aug_strength]
        return torch.tensor([ids], device=device, dtype=dtype).expand(batch, -1)

    def forward(self, latents, timestep, text, text_mask=None, cond=None):
        """latents `[B, C, F, h, w]` (already scaled by c_in), timestep `[B]` (c_noise), text
        `[B, 1, 1, D]` (the image embedding; the mask is unused), cond `[B, C + 1, F, h, w]`.
        Returns the v-prediction `[B, C, F, h, w]`."""
        if cond is None:
            raise ValueError("arch svd needs the image condition (cond)")
        C, F = latents.shape[1], latents.shape[2]
        image = cond[:, :C, :1].to(latents.dtype).expand(-1, -1, F, -1, -1)
        sample = torch.cat([latents, image], 1).transpose(1, 2)  # [B, F, 2C, h, w]
        out = self.unet(sample, timestep, encoder_hidden_states=text.flatten(1, 2).to(latents.dtype),
                        added_time_ids=self.added_time_ids(latents.shape[0], latents.device, latents.dtype),
                        return_dict=False)[0]
        return out.transpose(1, 2)
