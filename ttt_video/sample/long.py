"""Sliding-window generation: continue a video window by window past the model's own length.

Each window holds `window` frames; its first `overlap` frames are the last frames produced so
far, held fixed during sampling (`sample_euler(known=...)`) so the rest of the window is
sampled to continue them; the overlap is then cross-faded into the output. The same loop
extends an existing clip (`prefix`). Latents `[C, F, h, w]` per video.
"""

import torch

from ..diffusion.flow import sample_euler
from ..errors import UserError
from ..train.trainer import encode_captions


def check_window(window, overlap, frames_per_segment):
    if window <= 0 or window % frames_per_segment:
        raise UserError(f"--window must be a positive multiple of the model's segment length "
                        f"{frames_per_segment}, got {window}")
    if overlap < 0 or overlap >= window or overlap % frames_per_segment:
        raise UserError(f"--overlap must be a multiple of {frames_per_segment} in [0, {window}), got {overlap}")


def sliding_window(model, cfg, encoder, caption_at, num_frames, window, overlap, steps=None, guidance_scale=None,
                   seed=0, prefix=None, condition=True, progress=True):
    """`caption_at(segment)` gives the caption of output segment k (prefix segments included).
    Returns latents `[C, num_frames, h, w]`, starting with `prefix` when given.
    `condition=False` samples every window independently (for comparison)."""
    seg = cfg.data.frames_per_scene
    check_window(window, overlap, seg)
    device = next(model.parameters()).device
    C, h, w = cfg.model.in_channels, cfg.data.height, cfg.data.width
    g = torch.Generator().manual_seed(seed)
    out = None if prefix is None else prefix.to(device)
    if out is not None and out.shape[1] < overlap:
        raise UserError(f"the video to extend has {out.shape[1]} frames; the overlap needs {overlap}")
    while out is None or out.shape[1] < num_frames:
        start = 0 if out is None else out.shape[1] - overlap  # the window's first frame in the output
        first_seg = start // seg
        caps = [[caption_at(first_seg + i) for i in range(window // seg)]]
        cond = tuple(t.to(device) for t in encode_captions(encoder, caps))
        uncond = tuple(t.to(device) for t in encode_captions(encoder, [[""] * len(caps[0])]))
        noise = torch.randn(1, C, window, h, w, generator=g).to(device)
        known = known_frames = None
        if out is not None and condition and overlap:
            known = torch.zeros_like(noise)
            known[0, :, :overlap] = out[:, -overlap:]
            known_frames = torch.arange(window, device=device) < overlap
        x = sample_euler(model, noise, cond, uncond, steps=steps or cfg.diffusion.steps,
                         guidance_scale=cfg.diffusion.guidance_scale if guidance_scale is None else guidance_scale,
                         shift=cfg.diffusion.timestep_shift, progress=progress, known=known,
                         known_frames=known_frames)[0]
        if out is None:
            out = x
            continue
        if overlap:
            ramp = torch.linspace(0, 1, overlap + 2, device=device)[1:-1].view(1, -1, 1, 1)
            out = torch.cat([out[:, :-overlap], (1 - ramp) * out[:, -overlap:] + ramp * x[:, :overlap]], 1)
        out = torch.cat([out, x[:, overlap:]], 1)
    return out[:, :num_frames]
