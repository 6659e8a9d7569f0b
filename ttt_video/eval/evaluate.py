"""Score a checkpoint on held-out synthetic storyboards: sample, then run the scorer."""

from tqdm.auto import tqdm

from ..data.synthetic import held_out
from ..encoders.text import build_text_encoder
from ..errors import UserError
from ..sample.export import video_to_uint8
from ..sample.pipeline import bundled_checkpoint
from ..sample.sampler import sample_batch
from ..train.checkpoint import load_model
from ..train.trainer import resolve_device
from .scorer import CHANCE, score_batch


def evaluate(checkpoint=None, num_videos=32, num_scenes=None, steps=None, guidance_scale=None, seed=0,
             batch_size=16, device="auto", text_cache=None, progress=True, ema=False):
    """Mean scores over `num_videos` held-out storyboards (storyboard seeds 0..num_videos-1);
    `ema`: of the moving average of the weights the run kept."""
    model, cfg = load_model(checkpoint or bundled_checkpoint(), resolve_device(device), ema)
    if cfg.model.arch == "svd":
        raise UserError("evaluate samples captioned storyboards; a Stable Video Diffusion model takes an image")
    encoder = build_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, cache=text_cache,
                                 data_cfg=cfg.data)
    num_scenes = num_scenes or cfg.data.num_scenes
    boards = [held_out(i, num_scenes) for i in range(num_videos)]
    items = []
    for s in tqdm(range(0, num_videos, batch_size), desc="evaluate", disable=not progress):
        chunk = boards[s : s + batch_size]
        x = sample_batch(model, cfg, encoder, [b.captions for b in chunk], steps, guidance_scale, seed + s,
                         progress=False)
        items += [(video_to_uint8(v.cpu().clamp(-1, 1)), b) for v, b in zip(x, chunk)]
    scores = score_batch(items, cfg.data.frames_per_scene)
    scores["num_scenes"] = num_scenes
    return scores


def format_scores(scores):
    keys = ("color", "shape", "motion", "consistency")
    return "  ".join(f"{k} {scores[k]:.3f} (chance {CHANCE[k]:.3f})" for k in keys)
