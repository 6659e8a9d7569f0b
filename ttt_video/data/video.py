"""Video and image reading through PyAV: probe, decode at a target fps, resize and centre-crop.

Frames are uint8 `[F, H, W, 3]` until `to_tensor`, which gives float32 `[3, F, H, W]` in [-1, 1].
Images go through the same decoder (FFmpeg reads PNG, JPEG, WebP, ...), so a condition image is
resized exactly like a video frame.
"""

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

EPS = 1e-6  # seconds; absorbs rounding of timestamps


class VideoError(Exception):
    """A file that cannot be used; `kind` is "missing", "corrupt", "truncated" or "bad_image"."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    num_frames: int

    @property
    def duration(self):
        return self.num_frames / self.fps


def _reason(error):
    return getattr(error, "strerror", None) or str(error)


def _open(path, kind):
    path = Path(path)
    if not path.is_file():
        raise VideoError("missing", "file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(kind, f"cannot open: {_reason(e)}") from None
    streams = container.streams.video
    if not streams or streams[0].codec_context is None:  # none, or a header cut before its codec parameters
        container.close()
        raise VideoError(kind, "no video stream" if not streams else "no codec parameters for the video stream")
    return container


def probe(path):
    """Size, frame rate and frame count from the container, without decoding."""
    with _open(path, "corrupt") as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or not stream.width or not stream.height:
            raise VideoError("corrupt", "no frame rate or size in the header")
        frames = stream.frames
        if not frames:
            duration = (stream.duration * stream.time_base if stream.duration
                        else (container.duration or 0) / av.time_base)
            frames = int(round(float(duration) * float(rate)))
        if frames <= 0:
            raise VideoError("corrupt", "no frames")
        return VideoInfo(stream.width, stream.height, float(rate), int(frames))


def cover_size(height, width, target_h, target_w):
    """The smallest size of the same aspect ratio that covers (target_h, target_w)."""
    scale = max(target_h / height, target_w / width)
    return max(target_h, round(height * scale)), max(target_w, round(width * scale))


def _to_rgb(frame, size):
    if size is None:
        return frame.to_ndarray(format="rgb24")
    H, W = size
    sh, sw = cover_size(frame.height, frame.width, H, W)
    rgb = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation="AREA")
    top, left = (sh - H) // 2, (sw - W) // 2
    return rgb[top:top + H, left:left + W]  # [H, W, 3]


def decode(path, fps, num_frames, start=0.0, size=None):
    """`num_frames` frames at `fps` from `start` seconds: output frame k is the source frame on
    screen at time start + k / fps (so frames repeat when upsampling and are skipped when
    downsampling). `size` (H, W): resized to cover it, then centre-cropped. Returns uint8
    `[F, H, W, 3]`; raises VideoError when the file ends before the last requested time."""
    times = start + np.arange(num_frames) / fps
    out = []
    with _open(path, "corrupt") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base
        origin = stream.start_time or 0
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        if start > 0:
            container.seek(origin + int(start / tb), stream=stream, backward=True)
        held = held_rgb = None  # the frame on screen before the current one
        held_time = None
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float((frame.pts - origin) * tb)
                while len(out) < num_frames and t > times[len(out)] + EPS:
                    if held is None:  # the seek landed past the start: nothing earlier exists
                        held, held_time = frame, t
                    if held_rgb is None:
                        held_rgb = _to_rgb(held, size)
                    out.append(held_rgb)
                if len(out) == num_frames:
                    break
                held, held_rgb, held_time = frame, None, t
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError("corrupt", f"decoding failed after {len(out)} frames: {_reason(e)}") from None
        while len(out) < num_frames and held is not None and times[len(out)] < held_time + 1 / rate - EPS:
            if held_rgb is None:
                held_rgb = _to_rgb(held, size)
            out.append(held_rgb)
    if held_time is None:
        raise VideoError("truncated", f"no frames from {start:.2f} s on, {times[-1]:.2f} s needed")
    if len(out) < num_frames:
        raise VideoError("truncated", f"ends at {held_time + 1 / rate:.2f} s, {times[-1]:.2f} s needed")
    return np.stack(out)  # [F, H, W, 3]


def read_image(path, size=None):
    """One image as uint8 `[H, W, 3]`, resized to cover `size` and centre-cropped."""
    try:
        with _open(path, "bad_image") as container:
            for frame in container.decode(video=0):
                return _to_rgb(frame, size)
    except VideoError as e:
        raise VideoError("missing" if e.kind == "missing" else "bad_image", str(e)) from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError("bad_image", f"cannot decode: {_reason(e)}") from None
    raise VideoError("bad_image", "no image in the file")


def to_tensor(frames):
    """uint8 `[F, H, W, 3]` -> float32 `[3, F, H, W]` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
