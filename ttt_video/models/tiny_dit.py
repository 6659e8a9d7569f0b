"""A tiny video DiT in the TTT-Video layout.

Each block: attention local to each segment (its video tokens with its own caption tokens),
then a gated bidirectional TTT over the whole interleaved sequence, then the MLP; adaLN from
the timestep. `seq_mixer="attention"` drops the TTT (local attention only).

Layout: latents `[B, C, F, h, w]`; text `[B, S, Lt, Dt]` (one caption per segment);
tokens `[B, S * (Lt + Lv), D]`, each segment `[text, video]`.
"""

import math

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.attention import SegmentAttention
from ..layers.rope import rope_3d, with_text
from ..layers.ttt import BidirectionalTTT

SEQ_MIXERS = ("attention", "ttt-linear", "ttt-mlp")


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


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


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SegmentAttention(dim, cfg.num_heads)
        self.ttt = None
        if cfg.seq_mixer != "attention":
            self.ttt = BidirectionalTTT(dim, cfg.num_heads, kind=cfg.seq_mixer.removeprefix("ttt-"),
                                        mini_batch_size=cfg.ttt_mini_batch_size, base_lr=cfg.ttt_base_lr,
                                        gate_init=cfg.gate_init,
                                        impl=None if cfg.ttt_impl == "auto" else cfg.ttt_impl)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, num_segments, seg_rope, full_rope, key_mask):
        sa, ca, ga, sm, cm, gm = self.ada(c)[:, None].chunk(6, -1)
        x = x + ga * self.attn(modulate(self.norm1(x), sa, ca), num_segments, *seg_rope, key_mask)
        if self.ttt is not None:
            x = self.ttt(x, *full_rope)
        return x + gm * self.mlp(modulate(self.norm2(x), sm, cm))


class TinyDiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.seq_mixer not in SEQ_MIXERS:
            raise ValueError(f"unknown seq_mixer {cfg.seq_mixer!r}; choose one of {SEQ_MIXERS}")
        self.cfg = cfg
        pt, ph, pw = cfg.patch_size
        self.patch_dim = cfg.in_channels * pt * ph * pw
        self.patch_embed = nn.Linear(self.patch_dim, cfg.dim)
        self.text_embed = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.dim))
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.dim))  # text, video
        self.t_embed = TimestepEmbedder(cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.final = nn.Linear(cfg.dim, self.patch_dim)
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        self.initialize()

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.type_embed, std=0.02)
        for block in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, latents, timestep, text, text_mask=None):
        """latents `[B, C, F, h, w]` (F a multiple of S and of the time patch), timestep `[B]`,
        text `[B, S, Lt, Dt]`, text_mask `[B, S, Lt]` bool. Returns the prediction `[B, C, F, h, w]`."""
        B, C, F, h, w = latents.shape
        S, Lt = text.shape[1], text.shape[2]
        pt, ph, pw = self.cfg.patch_size
        if F % (S * pt) or h % ph or w % pw:
            raise ValueError(f"latents {tuple(latents.shape)} do not split into {S} segments of patches {self.cfg.patch_size}")
        gt, gh, gw = F // S // pt, h // ph, w // pw
        video = rearrange(latents, "b c (s t pt) (y ph) (x pw) -> b s (t y x) (c pt ph pw)",
                          s=S, pt=pt, ph=ph, pw=pw)
        video = self.patch_embed(video) + self.type_embed[1]  # [B, S, Lv, D]
        txt = self.text_embed(text) + self.type_embed[0]  # [B, S, Lt, D]
        x = torch.cat([txt, video], 2).flatten(1, 2)  # [B, S*(Lt+Lv), D]

        cos, sin = rope_3d(gt, gh, gw, self.cfg.dim // self.cfg.num_heads)
        seg_rope = tuple(t.to(x.device) for t in with_text(cos, sin, Lt, 1))
        full_rope = tuple(t.to(x.device) for t in with_text(cos, sin, Lt, S))
        key_mask = None
        if text_mask is not None:
            video_mask = torch.ones(B, S, video.shape[2], dtype=torch.bool, device=x.device)
            key_mask = torch.cat([text_mask.bool(), video_mask], 2)
        c = self.t_embed(timestep)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, c, S, seg_rope, full_rope, key_mask, use_reentrant=False)
            else:
                x = block(x, c, S, seg_rope, full_rope, key_mask)
        shift, scale = self.final_ada(c)[:, None].chunk(2, -1)
        x = self.final(modulate(self.final_norm(x), shift, scale))
        x = x.view(B, S, Lt + gt * gh * gw, -1)[:, :, Lt:]
        return rearrange(x, "b s (t y x) (c pt ph pw) -> b c (s t pt) (y ph) (x pw)",
                         t=gt, y=gh, x=gw, pt=pt, ph=ph, pw=pw)
