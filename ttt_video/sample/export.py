"""Frames to files: mp4 (libx264, yuv420p) and contact-sheet PNG.

Frames are uint8 `[F, H, W, 3]`. Small frames are enlarged by an integer nearest-neighbour
factor so players show them at a useful size; files are written next to their destination
under a temporary name and moved into place, so a half-written file never appears.
"""

import math
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch

from ..fileio import atomic_file

MIN_SIDE = 128
SHEET_GAP = 2
SHEET_GAP_COLOR = (96, 96, 96)


def video_to_uint8(x: torch.Tensor) -> np.ndarray:
    """`[C, F, H, W]` in [-1, 1] to uint8 `[F, H, W, 3]`; one channel is shown as grey."""
    if x.ndim != 4 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a video [C, F, H, W] with C in (1, 3), got {list(x.shape)}")
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(3, -1, -1, -1).permute(1, 2, 3, 0).cpu().numpy()  # [F, H, W, 3]


def upscale_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    return max(1, math.ceil(min_side / min(height, width)))


def enlarge(frames: np.ndarray, factor: int) -> np.ndarray:
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")


def write_video(frames: np.ndarray, path, fps: float, upscale: int | None = None) -> Path:
    """Write an mp4; `upscale` defaults to the smallest factor giving a short side >= 128 px.

    The enlarged frames are edge-padded at the bottom and right to multiples of 16.
    """
    _check_frames(frames)
    frames = enlarge(frames, upscale or upscale_factor(*frames.shape[1:3]))
    height, width = frames.shape[1:3]
    pad = ((0, 0), (0, -height % 16), (0, -width % 16), (0, 0))
    frames = np.ascontiguousarray(np.pad(frames, pad, mode="edge"))

    def write(tmp):
        writer = imageio_ffmpeg.write_frames(
            tmp, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, output_params=["-crf", "18"],
        )
        try:
            writer.send(None)
            for frame in frames:
                writer.send(frame)
        finally:
            writer.close()

    return atomic_file(Path(path), write)


def read_video(path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames)  # [F, H, W, 3]


def contact_sheet(frames: np.ndarray, path, columns: int | None = None,
                  frames_per_scene: int | None = None) -> Path:
    """Write a PNG grid of the frames: one row per scene when `frames_per_scene` is given."""
    _check_frames(frames)
    num_frames = len(frames)
    if frames_per_scene is not None:
        if num_frames % frames_per_scene:
            raise ValueError(f"{num_frames} frames do not split into scenes of {frames_per_scene}")
        columns = frames_per_scene
    columns = columns or math.ceil(math.sqrt(num_frames))
    rows = math.ceil(num_frames / columns)
    tiles = enlarge(frames, upscale_factor(*frames.shape[1:3]))
    th, tw = tiles.shape[1:3]
    sy, sx = th + SHEET_GAP, tw + SHEET_GAP
    sheet = np.empty((rows * sy - SHEET_GAP, columns * sx - SHEET_GAP, 3), np.uint8)
    sheet[:] = SHEET_GAP_COLOR
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * sy:r * sy + th, c * sx:c * sx + tw] = tile
    return atomic_file(Path(path), lambda tmp: iio.imwrite(tmp, sheet, extension=".png"))
