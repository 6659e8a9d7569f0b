"""A tiny video DiT in the TTT-Video layout.

Each block: attention local to each segment (its video tokens with its own caption tokens),
then a gated bidirectional TTT over the whole interleaved sequence, then the MLP; adaLN from
the timestep. `seq_mixer="attention"` drops the TTT (local attention only); `"swa"` replaces it
with gated sliding-window attention over the whole sequence (a long-context baseline).
With `condition_frames=1` it is an image-to-video model (`VideoDiT`: the first frame's latents
and a mask channel, patched like the latents, added through a zero-initialised embedding).

Layout: latents `[B, C, F, h, w]`; text `[B, S, Lt, Dt]` (one caption per segment);
tokens `[B, S * (Lt + Lv), D]`, each segment `[text, video]`.
"""

import torch
from einops import rearrange
from torch import nn

from ..errors import UserError
from ..layers.attention import SegmentAttention, SlidingWindowAttention
from ..layers.dit import VideoDiT, adaln, add_gated
from ..layers.rope import rope_3d, with_text
from ..layers.ttt import BidirectionalTTT

SEQ_MIXERS = ("attention", "swa", "ttt-linear", "ttt-mlp")


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SegmentAttention(dim, cfg.num_heads)
        self.ttt = None  # the sequence mixer over the whole video, after the local attention
        if cfg.seq_mixer == "swa":
            self.ttt = SlidingWindowAttention(dim, cfg.num_heads, cfg.swa_window, cfg.gate_init)
        elif cfg.seq_mixer != "attention":
            self.ttt = BidirectionalTTT(dim, cfg.num_heads, kind=cfg.seq_mixer.removeprefix("ttt-"),
                                        mini_batch_size=cfg.ttt_mini_batch_size, base_lr=cfg.ttt_base_lr,
                                        gate_init=cfg.gate_init,
                                        impl=None if cfg.ttt_impl == "auto" else cfg.ttt_impl)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = round(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, num_segments, seg_rope, full_rope, key_mask):
        sa, ca, ga, sm, cm, gm = self.ada(c)[:, None].chunk(6, -1)
        x = add_gated(x, ga, self.attn(adaln(self.norm1, x, sa, ca), num_segments, *seg_rope, key_mask))
        if self.ttt is not None:
            x = self.ttt(x, *full_rope)
        return add_gated(x, gm, self.mlp(adaln(self.norm2, x, sm, cm)))


class TinyDiT(VideoDiT):
    def __init__(self, cfg):
        if cfg.seq_mixer not in SEQ_MIXERS:
            raise UserError(f"unknown seq_mixer {cfg.seq_mixer!r}; choose one of {SEQ_MIXERS}")
        super().__init__(cfg)
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.dim))  # text, video
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.initialize()

    def initialize(self):
        super().initialize()
        nn.init.normal_(self.type_embed, std=0.02)

    def forward(self, latents, timestep, text, text_mask=None, cond=None):
        """latents `[B, C, F, h, w]` (F a multiple of S and of the time patch), timestep `[B]`,
        text `[B, S, Lt, Dt]`, text_mask `[B, S, Lt]` bool, cond `[B, C + 1, F, h, w]` (models with
        `condition_frames`; None: no condition). Returns the prediction `[B, C, F, h, w]`."""
        B = latents.shape[0]
        S, Lt = text.shape[1], text.shape[2]
        pt, ph, pw = self.cfg.patch_size
        txt, video, (gt, gh, gw) = self.segment_tokens(latents, text, cond)
        video = video + self.type_embed[1]  # [B, S, Lv, D]
        x = torch.cat([txt + self.type_embed[0], video], 2).flatten(1, 2)  # [B, S*(Lt+Lv), D]

        cos, sin = (t.to(x.device) for t in rope_3d(gt, gh, gw, self.cfg.dim // self.cfg.num_heads))
        seg_rope, full_rope = with_text(cos, sin, Lt, 1), with_text(cos, sin, Lt, S)
        key_mask = None
        if text_mask is not None:
            video_mask = torch.ones(B, S, video.shape[2], dtype=torch.bool, device=x.device)
            key_mask = torch.cat([text_mask.bool(), video_mask], 2)
        c = self.t_embed(timestep)
        for block in self.blocks:
            x = self.run_block(block, x, c, S, seg_rope, full_rope, key_mask)
        x = self.output(x, c)
        x = x.view(B, S, Lt + gt * gh * gw, -1)[:, :, Lt:]
        return rearrange(x, "b s (t y x) (c pt ph pw) -> b c (s t pt) (y ph) (x pw)",
                         t=gt, y=gh, x=gw, pt=pt, ph=ph, pw=pw)
