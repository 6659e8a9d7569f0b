"""Sliding-window generation: continue a video window by window past the model's own length.

Each window holds `window` frames; its first `overlap` frames are the last frames produced so
far, held fixed during sampling (`sample_batch(lead=...)`) so the rest of the window is
sampled to continue them; the overlap is then cross-faded into the output. The same loop
extends an existing clip (`prefix`). Latents `[C, F, h, w]` per video.
"""

import torch

from ..errors import UserError
from .sampler import sample_batch


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
    g = torch.Generator().manual_seed(seed)
    out = None if prefix is None else prefix.to(device)
    if out is not None and out.shape[1] < overlap:
        raise UserError(f"the video to extend has {out.shape[1]} frames; the overlap needs {overlap}")
    while out is None or out.shape[1] < num_frames:
        start = 0 if out is None else out.shape[1] - overlap  # the window's first frame in the output
        first_seg = start // seg
        caps = [[caption_at(first_seg + i) for i in range(window // seg)]]
        lead = out[None, :, -overlap:] if out is not None and condition and overlap else None
        x = sample_batch(model, cfg, encoder, caps, steps, guidance_scale, progress=progress, lead=lead,
                         generator=g)[0]
        if out is None:
            out = x
            continue
        if overlap:
            ramp = torch.linspace(0, 1, overlap + 2, device=device)[1:-1].view(1, -1, 1, 1)
            out = torch.cat([out[:, :-overlap], (1 - ramp) * out[:, -overlap:] + ramp * x[:, :overlap]], 1)
        out = torch.cat([out, x[:, overlap:]], 1)
    return out[:, :num_frames]
