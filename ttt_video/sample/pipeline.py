"""Text-to-video generation: captions -> segments -> sampler -> frames -> mp4 + contact sheet.

Image-to-video (`image`): a model trained with `model.condition_frames=1` takes the image as its
condition, and the first frame is held at the image while sampling. A Stable Video Diffusion
model (arch `svd`) takes the image and no captions; its video has `num_frames` frames (default:
`num_scenes * frames_per_scene`), with no segments.

Models working on VAE latents (`data.vae` not `identity`) get latents sized by the VAE, and the
result is decoded through it.

Segment rule: the model works in segments of `frames_per_scene` frames, one caption each.
With no length given, each caption gets one segment. With a frame count, the video has
ceil(frames / frames_per_scene) segments, the captions are spread over them in order (caption i
covers a consecutive run, earlier captions take the extra segment), and the decoded video is
cut to exactly the requested frame count.
"""

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..data.video import VideoError, read_image, to_tensor
from ..encoders.svd_image import SVDImageEncoder
from ..encoders.text import build_text_encoder
from ..encoders.vae import vae_from_config
from ..errors import UserError, first_sentence
from ..fileio import read_json
from ..models.svd import pipeline_folder
from ..train.checkpoint import load_config, load_model
from ..train.trainer import resolve_device
from .export import contact_sheet, read_video, video_to_uint8, write_video
from .long import check_window, sliding_window
from .sampler import sample_batch


class StoryboardError(UserError):
    """A storyboard file or caption list that cannot be used."""


def bundled_checkpoint():
    """The tiny demo model shipped inside the package (a Titans-memory DiT; README, "The bundled model")."""
    return Path(str(resources.files("ttt_video") / "assets" / "bundled"))


def read_storyboard(path):
    """A JSON list of segments, each a caption string or an object with "text"."""
    data = read_json(path, "storyboard", StoryboardError)
    if isinstance(data, dict) and "scenes" in data:
        data = data["scenes"]
    if not isinstance(data, list) or not data:
        raise StoryboardError(f"storyboard {path} must be a non-empty JSON list of segments")
    captions = []
    for i, entry in enumerate(data, 1):
        text = entry.get("text", entry.get("caption")) if isinstance(entry, dict) else entry
        if not isinstance(text, str) or not text.strip():
            raise StoryboardError(f"storyboard {path}: segment {i} has no caption text")
        captions.append(text)
    return captions


def plan_segments(num_captions, frames_per_segment, num_frames=None):
    """Caption index per segment and the padded frame count."""
    if num_captions < 1:
        raise StoryboardError("no prompts: give at least one caption")
    if num_frames is None:
        return list(range(num_captions)), num_captions * frames_per_segment
    if num_frames < 1:
        raise StoryboardError(f"the video needs at least one frame, got {num_frames}")
    segments = math.ceil(num_frames / frames_per_segment)
    if num_captions > segments:
        raise StoryboardError(f"{num_captions} captions need at least {num_captions} segments of "
                              f"{frames_per_segment} frames, but {num_frames} frames make {segments}")
    base, extra = divmod(segments, num_captions)
    plan = [i for i in range(num_captions) for _ in range(base + (i < extra))]
    return plan, segments * frames_per_segment


@dataclass
class Result:
    video: Path
    sheet: Path
    frames: "torch.Tensor"  # uint8 [F, H, W, 3]


def load_condition_image(path, cfg):
    """An image file as the condition `[1, 3, 1, H, W]` at the model's resolution, for a model
    trained with image conditioning."""
    if not cfg.model.condition_frames:
        raise UserError("the checkpoint's model was not trained with image conditioning "
                        "(model.condition_frames=0); --image needs an i2v model")
    try:
        frame = read_image(path, (cfg.data.height, cfg.data.width))
    except VideoError as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return to_tensor(frame[None])[None]


def _write(frames, out, fps, frames_per_segment):
    video = write_video(frames, out, fps=fps)
    sheet = contact_sheet(frames, out.with_suffix(".png"), columns=frames_per_segment)  # a row per segment
    return Result(video, sheet, frames)


def generate(captions, checkpoint=None, num_frames=None, seconds=None, fps=None, steps=None, guidance_scale=None,
             seed=0, out="outputs/video.mp4", device="auto", progress=True, text_cache=None, window=None,
             overlap=None, image=None, ema=False):
    """Sample one video for `captions` and write `out` (mp4) and its contact sheet (png).
    Length: `num_frames`, or `seconds` at `fps` (default: the model's fps), or one segment per caption.
    `window` (frames): generate window by window, each continuing the last `overlap` frames.
    `image`: an image file the video starts from (models trained with image conditioning).
    `ema`: sample with the moving average of the weights the run kept (`train.ema_decay`)."""
    out = Path(out)
    device = resolve_device(device)
    checkpoint = checkpoint or bundled_checkpoint()
    if window:  # before the model loads
        if image is not None:
            raise UserError("--image does not combine with --window")
        seg = load_config(checkpoint).data.frames_per_scene
        check_window(window, seg if overlap is None else overlap, seg)
    model, cfg = load_model(checkpoint, device, ema)
    svd = cfg.model.arch == "svd"
    cond_image = None
    if image is not None:
        cond_image = load_condition_image(image, cfg)
    elif svd:
        raise UserError("a Stable Video Diffusion model generates from an image: give --image")
    if svd and captions:
        raise UserError("a Stable Video Diffusion model takes no captions, only --image")
    fps = fps or cfg.data.fps
    if seconds is not None:
        num_frames = max(1, round(seconds * fps))
    seg = cfg.data.frames_per_scene
    vae = vae_from_config(cfg.data, device)
    if svd:  # one video of exactly the requested frames, with no captions or segments
        captions, plan, padded = [""], [0], num_frames or cfg.data.num_scenes * seg
        encoder = SVDImageEncoder(pipeline_folder(cfg.model.pretrained), vae, cfg.model.noise_aug_strength, device)
    else:
        plan, padded = plan_segments(len(captions), seg, num_frames)
        encoder = build_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, cache=text_cache,
                                     data_cfg=cfg.data)
        if cond_image is not None:
            cond_image = vae.encode(cond_image)[0]
    if window:
        x = sliding_window(model, cfg, encoder, lambda k: captions[plan[min(k, len(plan) - 1)]], padded, window,
                           seg if overlap is None else overlap, steps, guidance_scale, seed, progress=progress)
    else:
        x = sample_batch(model, cfg, encoder, [[captions[i] for i in plan]], steps, guidance_scale, seed,
                         progress, cond_image, vae=vae, num_frames=padded if svd else None)[0]
    x = vae.decode(x[None])[0]
    return _write(video_to_uint8(x.cpu().clamp(-1, 1))[: num_frames or padded], out, fps, seg)


def extend(video, captions, checkpoint=None, num_frames=None, seconds=None, steps=None, guidance_scale=None, seed=0,
           out="outputs/extended.mp4", window=None, overlap=None, device="auto", progress=True, text_cache=None,
           ema=False):
    """Continue the clip in `video` by `num_frames` (or `seconds` at the model's fps) new frames,
    window by window; the clip is resized to the model's resolution and kept as the opening."""
    out = Path(out)
    checkpoint = checkpoint or bundled_checkpoint()
    cfg = load_config(checkpoint)  # the checks before the model loads
    if cfg.model.arch == "svd":
        raise UserError("extend continues a video through captions; a Stable Video Diffusion model takes an image")
    seg = cfg.data.frames_per_scene
    window = window or cfg.data.num_scenes * seg
    overlap = seg if overlap is None else overlap
    check_window(window, overlap, seg)
    if seconds is not None:
        num_frames = round(seconds * cfg.data.fps)
    num_frames = num_frames or cfg.data.num_scenes * seg
    if num_frames < 1:
        raise UserError(f"the extension needs at least one new frame, got {num_frames}")
    try:
        clip = read_video(video)  # [F, H, W, 3]
    except (OSError, RuntimeError, StopIteration) as e:
        raise UserError(f"cannot read video {video}: {first_sentence(e)}") from None
    if len(clip) < overlap:
        raise UserError(f"the video to extend has {len(clip)} frames; the overlap needs {overlap}")
    model, cfg = load_model(checkpoint, resolve_device(device), ema)
    x = torch.from_numpy(clip.copy()).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, F, H, W]
    x = torch.nn.functional.interpolate(x, size=(cfg.data.height, cfg.data.width), mode="area")
    plan, _ = plan_segments(len(captions), seg, num_frames)
    known_segments = x.shape[1] // seg
    encoder = build_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, cache=text_cache,
                                 data_cfg=cfg.data)

    def caption_at(k):
        return captions[plan[min(max(k - known_segments, 0), len(plan) - 1)]]

    result = sliding_window(model, cfg, encoder, caption_at, x.shape[1] + num_frames, window, overlap, steps,
                            guidance_scale, seed, prefix=x, progress=progress)
    return _write(video_to_uint8(result.cpu().clamp(-1, 1)), out, cfg.data.fps, seg)
