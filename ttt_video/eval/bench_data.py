"""Benchmark the video data pipeline on the CPU: decode throughput and `prepare` throughput.

Writes `--clips` synthetic clips (a moving gradient with noise, so the codec has real work) of
`--seconds` s at `--source-fps` and `--source-size` with imageio (libx264), then measures
- decode: every item of the manifest dataset decoded, resampled to `--fps`, resized and
  centre-cropped to `--bucket` (one process);
- prepare: `ttt-video prepare` of the same manifest into a fresh cache (identity VAE, MiniLM
  captions), with each `--workers` count; the text encoder is loaded beforehand (its load
  time is printed on its own line).
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..data.buckets import parse_size
from ..errors import ArgumentParser, check_positive, int_list


def write_clips(folder, clips, seconds, fps, height, width, seed=0):
    import imageio.v2 as imageio

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    lines = []
    for c in range(clips):
        frames = []
        for f in range(int(seconds * fps)):
            phase = (x + 3 * f + 17 * c) / width + y / (2 * height)
            frame = (127 + 120 * np.sin(2 * np.pi * phase))[..., None] * np.array([1.0, 0.7, 0.4])
            frames.append(np.clip(frame + rng.normal(0, 8, frame.shape), 0, 255).astype(np.uint8))
        imageio.mimwrite(folder / f"clip{c}.mp4", frames, fps=fps, macro_block_size=1)
        lines.append(json.dumps({"video": f"clip{c}.mp4", "caption": f"a gradient moving right, clip {c}"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def data_config(manifest, args, bucket):
    height, width = bucket
    frames_per_scene = round(args.segment_seconds * args.fps)
    num_scenes = max(1, int(args.seconds / args.segment_seconds))
    return DataConfig(source="manifest", manifest=str(manifest), fps=args.fps, frames_per_scene=frames_per_scene,
                      num_scenes=num_scenes, height=height, width=width)


def main(argv=None):
    p = ArgumentParser(prog="ttt-video bench data", description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each clip")
    p.add_argument("--source-fps", type=float, default=24)
    p.add_argument("--source-size", default="360x640", help="HxW of the written clips")
    p.add_argument("--fps", type=int, default=8, help="training fps")
    p.add_argument("--segment-seconds", type=float, default=3.0)
    p.add_argument("--bucket", default="144x256", help="HxW the clips are resized and cropped to")
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts for prepare")
    args = p.parse_args(argv)
    check_positive(args, "clips", "seconds", "source_fps", "fps", "segment_seconds")
    source_size, bucket = parse_size(args.source_size, "--source-size"), parse_size(args.bucket, "--bucket")
    worker_counts = int_list(args, "workers")

    from ..data.cache import prepare
    from ..data.dataset import ManifestDataset
    from ..encoders.text import build_text_encoder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_clips(tmp, args.clips, args.seconds, args.source_fps, *source_size)
        cfg = data_config(manifest, args, bucket)
        print(f"{args.clips} clips of {args.seconds:g} s, {args.source_size} at {args.source_fps:g} fps -> "
              f"{cfg.frames_per_scene * cfg.num_scenes} frames at {args.fps} fps, {args.bucket}")
        t0 = time.perf_counter()
        dataset = ManifestDataset(cfg)
        for i in range(len(dataset)):
            dataset[i]
        seconds = time.perf_counter() - t0
        print(f"decode   workers=0: {len(dataset) / seconds:7.2f} clips/s ({len(dataset)} items in {seconds:.2f} s)")
        for workers in worker_counts:
            t0 = time.perf_counter()
            encoder = build_text_encoder(cfg.text_encoder, cfg.text_max_length)
            print(f"text encoder load: {time.perf_counter() - t0:.2f} s")
            t0 = time.perf_counter()
            result = prepare(cfg, tmp / f"cache{workers}", workers=workers, progress=False, text_encoder=encoder)
            seconds = time.perf_counter() - t0
            print(f"prepare  workers={workers}: {result.new / seconds:7.2f} clips/s "
                  f"({result.new} items in {seconds:.2f} s, identity VAE, MiniLM captions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
