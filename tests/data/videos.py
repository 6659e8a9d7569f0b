"""Small real videos for the data tests, written with imageio (libx264)."""

import json

import imageio.v2 as imageio
import numpy as np


def ramp_frames(num_frames, height=16, width=24, step=8):
    """Frame k is grey level step * k, with a red band over the left quarter and a blue band over
    the right quarter: the level tells which source frame was picked, the bands show the crop."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for k in range(num_frames):
        frames[k] = min(255, step * k)
    frames[:, :, : width // 4] = (255, 0, 0)
    frames[:, :, width - width // 4:] = (0, 0, 255)
    return frames


def write_video(path, frames, fps, faststart=False):
    params = ["-movflags", "+faststart"] if faststart else None
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=1, quality=10, output_params=params)
    return path


def level(frames):
    """Grey level of the centre pixel of each frame `[F, H, W, 3]`."""
    F, H, W, _ = frames.shape
    return frames[:, H // 2, W // 2, 1].astype(int)


def make_dataset(root, fps=8):
    """A folder of clips and a manifest with every kind of bad data; returns the manifest path.

    good    a.mp4  24 frames 16x24 (3 s at 8 fps), three per-segment captions, i2v from a.png
            b.mp4  20 frames 24x16 (portrait), one caption, forced t2v
            c.mp4  12 frames 16x24, one caption
    bad     missing.mp4 (not on disk), corrupt.mp4 (random bytes), trunc.mp4 (cut in half, index
            first so the header still promises every frame), short.mp4 (3 frames), d.mp4 with an
            unreadable cond_image, and one line that is not JSON (line 4)."""
    root.mkdir(parents=True, exist_ok=True)
    write_video(root / "a.mp4", ramp_frames(24), fps)
    write_video(root / "b.mp4", ramp_frames(20, 24, 16), fps)
    write_video(root / "c.mp4", ramp_frames(12), fps)
    write_video(root / "d.mp4", ramp_frames(12), fps)
    write_video(root / "short.mp4", ramp_frames(3), fps)
    write_video(root / "full.mp4", ramp_frames(30), fps, faststart=True)
    data = (root / "full.mp4").read_bytes()
    (root / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (root / "full.mp4").unlink()
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    imageio.imwrite(root / "a.png", np.full((32, 48, 3), 200, np.uint8))
    (root / "bad.png").write_bytes(b"not an image")
    lines = [
        {"video": "a.mp4", "captions": ["first", "second", "third"], "task": "i2v", "cond_image": "a.png"},
        {"video": "b.mp4", "caption": "portrait", "task": "t2v"},
        {"video": "c.mp4", "caption": "short wide"},
        "{not json",
        {"video": "missing.mp4", "caption": "x"},
        {"video": "corrupt.mp4", "caption": "x"},
        {"video": "trunc.mp4", "caption": "truncated"},
        {"video": "short.mp4", "caption": "x"},
        {"video": "d.mp4", "caption": "x", "cond_image": "bad.png"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return manifest
