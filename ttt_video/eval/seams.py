"""How visible are the seams of sliding-window generation?

For each seam (the first frame a window adds) the jump is the mean absolute pixel change from
the frame before, divided by the mean change between the other consecutive frames of the video
(1.0: a seam looks like any other frame step). Run on the bundled model, conditioned windows
(each continues the last frames) against independent windows (the same captions and blending,
no conditioning).
"""


import numpy as np

from ..data.synthetic import held_out
from ..encoders.text import build_text_encoder
from ..errors import ArgumentParser, UserError, check_positive
from ..sample.export import video_to_uint8
from ..sample.long import check_window, sliding_window
from ..sample.pipeline import bundled_checkpoint
from ..train.checkpoint import load_config, load_model
from .scorer import detect_color, foreground


def seam_jump(frames, seams):
    """frames uint8 `[F, H, W, 3]`; seams: indices of the first frame after each seam."""
    diffs = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # diffs[i]: i -> i+1
    at = np.array([s - 1 for s in seams])
    rest = np.delete(diffs, at)
    return float(diffs[at].mean() / rest.mean())


def color_changes(frames, seams):
    """Fraction of seams across which the detected object colour changes."""
    def color(f):
        return detect_color(f[None], foreground(f[None]))
    return float(np.mean([color(frames[s - 1]) != color(frames[s]) for s in seams]))


def run(num_videos=8, num_segments=9, window=24, overlap=8, steps=20, checkpoint=None, progress=True):
    checkpoint = checkpoint or bundled_checkpoint()
    seg = load_config(checkpoint).data.frames_per_scene  # the checks come before the model loads
    check_window(window, overlap, seg)
    num_frames = num_segments * seg
    seams = list(range(window, num_frames, window - overlap))
    if not seams:
        raise UserError(f"{num_segments} segments ({num_frames} frames) fit in one window of {window}: no seam to "
                        "measure; give more --num-segments or a smaller --window")
    model, cfg = load_model(checkpoint)
    encoder = build_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length)
    rows = {}
    for condition in (True, False):
        jumps, changes = [], []
        for i in range(num_videos):
            captions = held_out(i, num_segments).captions
            x = sliding_window(model, cfg, encoder, lambda k: captions[min(k, len(captions) - 1)], num_frames,
                               window, overlap, steps=steps, seed=i, condition=condition, progress=False)
            frames = video_to_uint8(x.cpu().clamp(-1, 1))
            jumps.append(seam_jump(frames, seams))
            changes.append(color_changes(frames, seams))
        rows["conditioned" if condition else "independent"] = (np.mean(jumps), np.mean(changes))
    return rows


def main(argv=None):
    p = ArgumentParser(prog="ttt-video bench seams", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--num-segments", type=int, default=9)
    p.add_argument("--window", type=int, default=24)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpoint")
    a = p.parse_args(argv)
    check_positive(a, "num_videos", "num_segments", "window", "steps")
    rows = run(a.num_videos, a.num_segments, a.window, a.overlap, a.steps, a.checkpoint)
    print(f"{a.num_videos} held-out storyboards, {a.num_segments} segments, window {a.window}, overlap {a.overlap}")
    print(f"{'windows':<12} {'seam jump':>10} {'colour changes at seams':>24}")
    for name, (jump, change) in rows.items():
        print(f"{name:<12} {jump:>10.3f} {change:>24.3f}")
