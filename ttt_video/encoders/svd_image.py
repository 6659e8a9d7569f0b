"""Stable Video Diffusion's conditioning of a video on an image, for training and sampling alike.

- The CLIP image embedding of the clean image (`image_encoder/`, a `CLIPVisionModelWithProjection`;
  the image is resized to `feature_extractor/`'s crop size, bicubic with antialiasing, and
  normalised with its mean and std, as `CLIPImageProcessor` would) is the model's one text
  token `[B, 1, 1, D]`.
- The VAE latents of the image with `noise_aug_strength` Gaussian noise added in pixel space,
  taken as the posterior's mode in the VAE's own units (not multiplied by the scaling factor,
  unlike the video's latents: SVD was trained so), go to frame 0 of the condition
  `[B, C + 1, F, h, w]` (`condition_input`).
- The unconditional input (caption dropout in training, the guidance's other branch) is zeros
  in both, as SVD's pipeline uses.

Both encoders are frozen and live here, outside the model, so checkpoints, the optimizer and
DDP see only the UNet. Images `[B, 3, 1, H, W]` in [-1, 1].
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..fileio import read_json
from ..layers.dit import condition_input
from .vae import item_generator

AUG_STREAM = 2  # item_generator([seed, item, AUG_STREAM]): the condition's noise, apart from the latents'


class SVDImageEncoder:
    def __init__(self, pipeline, vae, noise_aug_strength, device="cpu"):
        from transformers import CLIPVisionModelWithProjection

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder = Path(pipeline)
        for sub, name in (("image_encoder", "config.json"), ("feature_extractor", "preprocessor_config.json")):
            if not (folder / sub / name).is_file():
                raise UserError(f"Stable Video Diffusion files missing: {folder / sub / name}")
        if not hasattr(vae, "scaling_factor"):
            raise UserError("arch svd needs the pipeline's VAE: set data.vae to its vae/ folder")
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", local_files_only=True)
        self.encoder.to(device).eval().requires_grad_(False)
        processor = read_json(folder / "feature_extractor" / "preprocessor_config.json", "image processor config",
                              UserError)
        try:
            self.size = (processor["crop_size"]["height"], processor["crop_size"]["width"])
            self.mean = torch.tensor(processor["image_mean"], device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(processor["image_std"], device=device).view(1, 3, 1, 1)
        except (KeyError, TypeError):
            raise UserError(f"{folder / 'feature_extractor'}: preprocessor_config.json needs crop_size "
                            "(height, width), image_mean and image_std") from None
        self.vae, self.noise_aug_strength, self.device = vae, noise_aug_strength, device

    @torch.no_grad()
    def embed(self, image):
        """CLIP image embedding `[B, 1, 1, D]` of images `[B, 3, 1, H, W]`."""
        x = F.interpolate(image[:, :, 0].to(self.device, torch.float32), size=self.size, mode="bicubic",
                          antialias=True, align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.encoder(x.to(self.encoder.dtype)).image_embeds.float()[:, None, None]

    @torch.no_grad()
    def latents(self, image, noise):
        """Unscaled latents `[B, C, 1, h, w]` of the images with `noise` `[B, 3, 1, H, W]` added."""
        mean, _ = self.vae.encode(image.to(self.device) + self.noise_aug_strength * noise.to(self.device))
        return mean / self.vae.scaling_factor

    def __call__(self, image, num_frames, noise, active=None):
        """The model's (text `[B, 1, 1, D]`, mask `[B, 1, 1]`, cond `[B, C + 1, F, h, w]`) for
        images `[B, 3, 1, H, W]`; items with `active` `[B]` False get the unconditional zeros."""
        B = image.shape[0]
        active = torch.ones(B, dtype=torch.bool) if active is None else active.cpu()
        text = self.embed(image) * active.view(B, 1, 1, 1).to(self.device)
        cond = condition_input(self.latents(image, noise), num_frames, active)
        return text, torch.ones(B, 1, 1, dtype=torch.bool, device=self.device), cond

    def training_inputs(self, batch, num_frames, indices, drop, seed):
        """The inputs of a training batch. Every item is image-to-video: the condition is the
        manifest's `cond_image` where an item has one, else the clip's first frame. A dropped
        caption (`drop` `[B, S]`) drops the image, the only condition SVD has. The noise
        augmentation of item i is drawn from (seed, i)."""
        image = batch["video"][:, :, :1]
        if "cond_image" in batch:
            given = torch.tensor([task == "i2v" for task in batch["task"]]).view(-1, 1, 1, 1, 1)
            image = torch.where(given, batch["cond_image"], image)
        noise = torch.stack([torch.randn(image.shape[1:], generator=item_generator([seed, i, AUG_STREAM]))
                             for i in indices])
        return self(image, num_frames, noise, ~drop.any(1))
