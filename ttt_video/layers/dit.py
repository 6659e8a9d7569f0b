"""Pieces every video DiT here shares: timestep embedding, adaLN modulation, and a base class
with the patch / caption embedders, the modulated output layer and adaLN-zero initialisation.

Latents `[B, C, F, h, w]`; patches `(pt, ph, pw)`; tokens `[..., D]`.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fusion import fused


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def modulated_norm(x, weight, bias, shift, scale, eps=1e-5):
    """adaLN: a LayerNorm of x's rows (weight and bias None without its affine), then `modulate` by shift and
    scale `[B, 1, ..., D]` (each batch element its own)."""
    return modulate(F.layer_norm(x, x.shape[-1:], weight, bias, eps), shift, scale)


def gated_residual(x, gate, y):
    """x + gate y: a block's gated residual, the gate `[B, 1, ..., D]` (each batch element its own) or `[D]`."""
    return x + gate * y


def add_gated(x, gate, y):
    """`gated_residual`, one fused kernel each way on CUDA where `layers.fusion` fuses."""
    return fused(gated_residual, x)(x, gate, y)


def adaln(norm, x, shift, scale):
    """`modulate(norm(x), shift, scale)` for a LayerNorm module `norm`: one fused kernel each way on CUDA where
    `layers.fusion` fuses."""
    return fused(modulated_norm, x)(x, norm.weight, norm.bias, shift, scale, norm.eps)


def condition_input(cond_latents, num_frames, active=None):
    """The image condition of a video DiT: `cond_latents` `[B, C, 1, h, w]` at frame 0, zeros at the
    other frames, and a mask channel that is 1 where a condition is given; items with `active`
    `[B]` False get no condition. Returns `[B, C + 1, num_frames, h, w]`."""
    B, C, _, h, w = cond_latents.shape
    cond = cond_latents.new_zeros(B, C + 1, num_frames, h, w)
    on = torch.ones(B, device=cond.device) if active is None else active.to(cond.device, cond.dtype)
    cond[:, :C, :1] = cond_latents * on.view(B, 1, 1, 1, 1)
    cond[:, C, 0] = on.view(B, 1, 1)
    return cond


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        """t `[B]` in [0, 1000]."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], -1))


class VideoDiT(nn.Module):
    """Base of the from-scratch DiTs. Subclasses add `blocks` (each with an adaLN `ada` whose last
    layer starts at zero, so every block starts as the identity) and write `forward`.

    With `condition_frames=1` (image-to-video) a condition `[B, C + 1, F, h, w]` (`condition_input`)
    is patched like the latents and added to the video tokens through `cond_embed`, which starts at
    zero: training starts from the unconditioned model, whose checkpoint loads into this one."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.condition_frames not in (0, 1):
            raise ValueError(f"condition_frames must be 0 or 1 (the first frame), got {cfg.condition_frames}")
        self.cfg = cfg
        pt, ph, pw = cfg.patch_size
        self.patch_dim = cfg.in_channels * pt * ph * pw
        self.patch_embed = nn.Linear(self.patch_dim, cfg.dim)
        self.cond_embed = nn.Linear((cfg.in_channels + 1) * pt * ph * pw, cfg.dim) if cfg.condition_frames else None
        self.text_embed = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.dim))
        self.t_embed = TimestepEmbedder(cfg.dim)
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.final = nn.Linear(cfg.dim, self.patch_dim)
        self.text_dim = cfg.text_dim  # width of the text embeddings it takes
        self.gradient_checkpointing = False  # recompute each block's activations in backward

    def enable_gradient_checkpointing(self, enabled=True):
        self.gradient_checkpointing = enabled
        return self

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [block.ada[-1] for block in self.blocks] + [self.final_ada[-1], self.final]
        for layer in zero + ([self.cond_embed] if self.cond_embed is not None else []):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def add_condition(self, tokens, latents, cond, patches):
        """Video tokens plus the embedded image condition. `patches` turns `[B, C', F, h, w]` into
        patches laid out as `tokens`; a conditioned model given no `cond` gets the empty condition."""
        if self.cond_embed is None:
            if cond is not None:
                raise ValueError("this model takes no image condition (model.condition_frames=0)")
            return tokens
        if cond is None:
            cond = condition_input(latents[:, :, :1], latents.shape[2],
                                   torch.zeros(latents.shape[0], dtype=torch.bool))
        return tokens + self.cond_embed(patches(cond.to(tokens.dtype)))

    def grid(self, latents, num_segments):
        """Patch grid (t, y, x) of one segment; rejects latents that do not split evenly."""
        _, _, F, h, w = latents.shape
        pt, ph, pw = self.cfg.patch_size
        if F % (num_segments * pt) or h % ph or w % pw:
            raise ValueError(f"latents {tuple(latents.shape)} do not split into {num_segments} segments "
                             f"of patches {self.cfg.patch_size}")
        return F // num_segments // pt, h // ph, w // pw

    def segment_tokens(self, latents, text, cond=None):
        """Per-segment embeddings: captions `[B, S, Lt, D]`, video patches `[B, S, Lv, D]` (with the
        image condition of models that take one), and one segment's patch grid (t, y, x)."""
        S = text.shape[1]
        pt, ph, pw = self.cfg.patch_size
        grid = self.grid(latents, S)

        def patches(v):
            return rearrange(v, "b c (s t pt) (y ph) (x pw) -> b s (t y x) (c pt ph pw)", s=S, pt=pt, ph=ph, pw=pw)

        video = self.add_condition(self.patch_embed(patches(latents)), latents, cond, patches)
        return self.text_embed(text), video, grid

    def run_block(self, block, *args):
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def output(self, x, c):
        """Modulated final layer: tokens `[B, ..., D]` -> patches `[B, ..., patch_dim]`."""
        shift, scale = self.final_ada(c).view(c.shape[0], *[1] * (x.dim() - 2), -1).chunk(2, -1)
        return self.final(adaln(self.final_norm, x, shift, scale))
