"""Synthetic storyboards: one coloured shape on a dark background, one caption per scene.

The object's colour is drawn once and kept for the whole video, but only the first caption
names it; shape and motion are named in every caption and may change from scene to scene.
Getting the colour of a later scene right therefore needs memory of the first scene.

Captions:
    scene 1:                "a {color} {shape} moves {motion}"
    later, shape changed:   "the shape becomes a {shape} and moves {motion}"
                         or "it moves {motion} as a {shape}"
    later, shape unchanged: "it moves {motion} as a {shape}"

In every scene the object (side 40% of the short side of the frame) is centred across the
direction of motion and travels from touching one edge to touching the opposite one, so the
video is fully determined by the storyboard.

Videos: `render` gives uint8 `[F, H, W, 3]`; the dataset gives float32 `[3, F, H, W]` in [-1, 1],
with F = num_scenes * frames_per_scene.

Splits: storyboard seeds below `HELD_OUT_SEED` are for training (`SyntheticStoryboards` item i
of seed s uses storyboard seed s * size + i); `held_out(k, num_scenes)` uses seed
HELD_OUT_SEED + k. With few scenes the number of distinct storyboards is small, so the two
splits differ by seed, not necessarily by content.
"""

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "magenta": (215, 50, 210),
    "cyan": (40, 210, 215),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")
BACKGROUND = (16, 16, 24)
OBJECT_SIZE = 0.4  # side of the object, as a fraction of the frame's short side
HELD_OUT_SEED = 1_000_000_000


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    motion: str
    caption: str


@dataclass
class Storyboard:
    scenes: list[Scene]

    @property
    def captions(self) -> list[str]:
        return [scene.caption for scene in self.scenes]

    @property
    def color(self) -> str:
        return self.scenes[0].color

    def to_dict(self) -> dict:
        return {"scenes": [asdict(scene) for scene in self.scenes]}

    @classmethod
    def from_dict(cls, d: dict) -> "Storyboard":
        return cls([Scene(**scene) for scene in d["scenes"]])


def make_storyboard(seed: int, num_scenes: int) -> Storyboard:
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be at least 1, got {num_scenes}")
    rng = np.random.default_rng(seed)
    color = str(rng.choice(list(COLORS)))
    scenes = []
    for k in range(num_scenes):
        shape, motion = str(rng.choice(SHAPES)), str(rng.choice(MOTIONS))
        if k == 0:
            caption = f"a {color} {shape} moves {motion}"
        elif shape != scenes[-1].shape and rng.random() < 0.5:
            caption = f"the shape becomes a {shape} and moves {motion}"
        else:
            caption = f"it moves {motion} as a {shape}"
        scenes.append(Scene(color, shape, motion, caption))
    return Storyboard(scenes)


def all_captions() -> list[str]:
    """Every caption a storyboard can hold, plus the empty caption (the unconditional input)."""
    first = [f"a {c} {s} moves {m}" for c in COLORS for s in SHAPES for m in MOTIONS]
    later = [t.format(shape=s, motion=m) for t in ("the shape becomes a {shape} and moves {motion}",
                                                   "it moves {motion} as a {shape}")
             for s in SHAPES for m in MOTIONS]
    return ["", *first, *later]


def held_out(seed: int, num_scenes: int) -> Storyboard:
    """Evaluation storyboard `seed` (0, 1, ...), from a seed range no training item uses."""
    return make_storyboard(HELD_OUT_SEED + seed, num_scenes)


def parse_caption(text: str) -> dict:
    """The colour (None when not named), shape and motion a caption names."""
    words = set(re.findall(r"[a-z]+", text.lower()))

    def find(vocab):
        found = [w for w in vocab if w in words]
        return found[0] if len(found) == 1 else None

    return {"color": find(COLORS), "shape": find(SHAPES), "motion": find(MOTIONS)}


def shape_mask(shape: str, cy: float, cx: float, size: float, height: int, width: int) -> np.ndarray:
    """Boolean `[H, W]` mask of a shape of side `size` centred at (cy, cx), in pixel units."""
    y = np.arange(height)[:, None] + 0.5 - cy
    x = np.arange(width)[None, :] + 0.5 - cx
    half = size / 2
    if shape == "circle":
        return x**2 + y**2 <= half**2
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "triangle":  # apex up, base at the bottom
        return (y <= half) & (np.abs(x) <= (y + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(storyboard: Storyboard, frames_per_scene: int, height: int, width: int) -> np.ndarray:
    size = OBJECT_SIZE * min(height, width)
    video = np.empty((len(storyboard.scenes) * frames_per_scene, height, width, 3), np.uint8)
    video[:] = BACKGROUND
    progress = np.linspace(0.0, 1.0, frames_per_scene) if frames_per_scene > 1 else [0.5]
    for k, scene in enumerate(storyboard.scenes):
        horizontal = scene.motion in ("left", "right")
        extent = width if horizontal else height
        start, end = size / 2, extent - size / 2
        if scene.motion in ("left", "up"):
            start, end = end, start
        for f, p in enumerate(progress):
            along = start + p * (end - start)
            cy, cx = (height / 2, along) if horizontal else (along, width / 2)
            mask = shape_mask(scene.shape, cy, cx, size, height, width)
            video[k * frames_per_scene + f][mask] = COLORS[scene.color]
    return video  # [F, H, W, 3]


class SyntheticStoryboards(Dataset):
    """Rendered storyboards, deterministic in (seed, index); batch them with `collate`."""

    def __init__(self, num_scenes: int, frames_per_scene: int, height: int, width: int,
                 seed: int = 0, size: int = 10_000):
        if (seed + 1) * size > HELD_OUT_SEED:
            raise ValueError(f"seed {seed} with size {size} reaches the held-out seed range")
        self.num_scenes, self.frames_per_scene = num_scenes, frames_per_scene
        self.height, self.width = height, width
        self.seed, self.size = seed, size

    def __len__(self) -> int:
        return self.size

    def storyboard(self, i: int) -> Storyboard:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} storyboards")
        return make_storyboard(self.seed * self.size + i, self.num_scenes)

    def __getitem__(self, i: int) -> dict:
        storyboard = self.storyboard(i)
        frames = render(storyboard, self.frames_per_scene, self.height, self.width)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, F, H, W]
        return {"video": video, "captions": storyboard.captions, "storyboard": storyboard}


def collate(items: list[dict]) -> dict:
    """Stack videos to `[B, 3, F, H, W]`; captions stay a list (per video) of lists (per scene)."""
    return {
        "video": torch.stack([item["video"] for item in items]),
        "captions": [item["captions"] for item in items],
        "storyboard": [item["storyboard"] for item in items],
    }
