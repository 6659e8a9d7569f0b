"""One batch of videos from captions: text encoding, noise, guided sampling, optional known
leading frames (an image to start from, or the overlap a sliding window continues).

Latents `[B, C, F, h, w]`; captions: B lists of one caption per segment.
"""

import torch

from ..diffusion.flow import sample_euler
from ..errors import UserError
from ..layers.dit import condition_input
from ..train.trainer import encode_captions


def sample_batch(model, cfg, encoder, captions, steps=None, guidance_scale=None, seed=0, progress=True,
                 cond_image=None, lead=None, generator=None):
    """Sample B videos at once. `cond_image` `[B, C, 1, h, w]`: the first frame, given to the model
    as its condition (models with `condition_frames`) and held during sampling. `lead`
    `[B, C, K, h, w]`: leading frames held during sampling. Noise comes from `generator`, or from
    one seeded by `seed`. Returns the latents `[B, C, S * frames_per_scene, h, w]`."""
    if cfg.diffusion.objective == "v-prediction":
        raise UserError("this model was trained with v-prediction (CogVideoX); sample it with "
                        "`ttt-video generate --model PIPELINE --ttt-checkpoint CHECKPOINT`")
    device = next(model.parameters()).device
    B, S = len(captions), len(captions[0])
    cond = encode_captions(encoder, captions)
    uncond = encode_captions(encoder, [[""] * S] * B)
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    shape = (B, cfg.model.in_channels, S * cfg.data.frames_per_scene, cfg.data.height, cfg.data.width)
    noise = torch.randn(shape, generator=g)
    model_fn = model
    if cond_image is not None:
        image = condition_input(cond_image.to(device), shape[2])

        def conditioned(x, t, *text):
            return model(x, t, *text, cond=image.repeat(x.shape[0] // B, 1, 1, 1, 1))

        model_fn, lead = conditioned, cond_image
    known = known_frames = None
    if lead is not None:
        known = torch.zeros(shape, device=device)
        known[:, :, : lead.shape[2]] = lead.to(device)
        known_frames = torch.arange(shape[2], device=device) < lead.shape[2]
    return sample_euler(model_fn, noise.to(device), tuple(t.to(device) for t in cond),
                        tuple(t.to(device) for t in uncond), steps=steps or cfg.diffusion.steps,
                        guidance_scale=cfg.diffusion.guidance_scale if guidance_scale is None else guidance_scale,
                        shift=cfg.diffusion.timestep_shift, progress=progress, known=known,
                        known_frames=known_frames)
