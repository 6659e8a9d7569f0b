"""One batch of videos: conditioning, noise, guided sampling, optional known leading frames (an
image to start from, or the overlap a sliding window continues).

The conditioning comes from the encoder: captions through a text encoder, or, for Stable Video
Diffusion, an image through its image encoder (`encoders.svd_image`). The sampler comes from the
objective: Euler over the flow (`diffusion.flow`) or Euler over Karras sigmas (`diffusion.edm`).

Latents `[B, C, F, h, w]`; captions: B lists of one caption per segment.
"""

import torch

from ..diffusion.edm import frame_guidance, karras_sigmas, sample_edm
from ..diffusion.flow import sample_euler
from ..encoders.svd_image import SVDImageEncoder
from ..errors import UserError
from ..layers.dit import condition_input
from ..train.trainer import encode_captions


def sample_batch(model, cfg, encoder, captions, steps=None, guidance_scale=None, seed=0, progress=True,
                 cond_image=None, lead=None, generator=None, vae=None, num_frames=None):
    """Sample B videos at once. `cond_image` `[B, C, 1, h, w]`: the first frame, given to the model
    as its condition (models with `condition_frames`) and held during sampling; for an image
    encoder, the image's pixels `[B, 3, 1, H, W]`, its only condition (not held). `lead`
    `[B, C, K, h, w]`: leading frames held during sampling. Noise comes from `generator`, or from
    one seeded by `seed`. `vae`: the latents' VAE (None: the model works on pixels). Returns the
    latents `[B, C, F, h, w]`, F = `num_frames` or S * frames_per_scene."""
    if cfg.diffusion.objective == "v-prediction":
        raise UserError("this model was trained with v-prediction (CogVideoX); sample it with "
                        "`ttt-video generate --model PIPELINE --ttt-checkpoint CHECKPOINT`")
    device = next(model.parameters()).device
    B, S = len(captions), len(captions[0])
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    down = vae.spatial_compression if vae is not None else 1
    shape = (B, cfg.model.in_channels, num_frames or S * cfg.data.frames_per_scene, cfg.data.height // down,
             cfg.data.width // down)
    noise = torch.randn(shape, generator=g)
    model_fn = model
    if isinstance(encoder, SVDImageEncoder):
        if cond_image is None:
            raise UserError("a Stable Video Diffusion model generates from an image: give --image")
        text, mask, image = encoder(cond_image, shape[2], torch.randn(cond_image.shape, generator=g))
        cond, uncond = (text, mask, image), (torch.zeros_like(text), mask, torch.zeros_like(image))

        def image_conditioned(x, t, text, mask, image):
            return model(x, t, text, mask, cond=image)

        model_fn = image_conditioned
    else:
        cond = encode_captions(encoder, captions)
        uncond = encode_captions(encoder, [[""] * S] * B)
        if cond_image is not None:
            image = condition_input(cond_image.to(device), shape[2])

            def conditioned(x, t, *text):
                return model(x, t, *text, cond=image.repeat(x.shape[0] // B, 1, 1, 1, 1))

            model_fn, lead = conditioned, cond_image
    cond, uncond = tuple(c.to(device) for c in cond), tuple(u.to(device) for u in uncond)
    steps = steps or cfg.diffusion.steps
    scale = cfg.diffusion.guidance_scale if guidance_scale is None else guidance_scale
    if cfg.diffusion.objective == "edm":
        if lead is not None:
            raise UserError("the edm sampler holds no known frames (an i2v first frame, --window, extend)")
        sigmas = karras_sigmas(steps, cfg.diffusion.sigma_min, cfg.diffusion.sigma_max)
        guidance = frame_guidance(cfg.diffusion.min_guidance_scale, scale, shape[2])
        return sample_edm(model_fn, noise.to(device), cond, uncond, sigmas, guidance, progress)
    known = known_frames = None
    if lead is not None:
        known = torch.zeros(shape, device=device)
        known[:, :, : lead.shape[2]] = lead.to(device)
        known_frames = torch.arange(shape[2], device=device) < lead.shape[2]
    return sample_euler(model_fn, noise.to(device), cond, uncond, steps=steps, guidance_scale=scale,
                        shift=cfg.diffusion.timestep_shift, progress=progress, known=known, known_frames=known_frames)
