"""Does a generated video follow its synthetic storyboard? Colour, shape and motion per scene.

Frames are uint8 `[F, H, W, 3]` with F = num_scenes * frames_per_scene. In each scene:
- foreground: pixels farther than `FOREGROUND_DISTANCE` (RGB, L2) from the background colour;
- colour: the palette colour nearest to the mean foreground colour over the scene;
- object mask: pixels more than half-way from the background to that colour (projected on the
  line between them, so a blurred edge stays where it was), then a 3x3 majority filter
  against isolated noisy pixels;
- shape, over the middle half of the scene's frames: a triangle (apex up) when the mask's
  area in the top half of its bounding box is well under that in the bottom half (1/3 for a
  triangle, 1 otherwise), which survives blurred corners; otherwise a square when the mask
  fills its bounding box (~1) and a circle when it does not (~0.785);
- motion: the direction of the larger axis of the mask centroid's displacement across the
  scene (least-squares slope over frames that have an object, times the scene length); a
  displacement under `MIN_TRAVEL` of the frame counts as no motion.
A scene without foreground is predicted as None, which never matches.
"""

import numpy as np

from ttt_video.data.synthetic import BACKGROUND, COLORS, MOTIONS, SHAPES, Storyboard

FOREGROUND_DISTANCE = 80.0
MIN_TRAVEL = 0.1
TRIANGLE_BELOW = 0.6  # top-to-bottom area balance: triangle 1/3, circle and square 1
SQUARE_ABOVE = 0.92  # fill ratio of the bounding box: square 1, circle ~0.785

# Consistency chance: a model that draws scene 1 right and guesses the colour later on.
CHANCE = {
    "color": 1 / len(COLORS),
    "shape": 1 / len(SHAPES),
    "motion": 1 / len(MOTIONS),
    "consistency": 1 / len(COLORS),
}
_PALETTE = np.array(list(COLORS.values()), np.float64)  # [K, 3]


def foreground(frames: np.ndarray) -> np.ndarray:
    diff = frames.astype(np.float64) - np.array(BACKGROUND, np.float64)
    return np.linalg.norm(diff, axis=-1) > FOREGROUND_DISTANCE  # [F, H, W]


def detect_color(frames: np.ndarray, mask: np.ndarray) -> str | None:
    if not mask.any():
        return None
    mean = frames[mask].astype(np.float64).mean(0)  # [3]
    return list(COLORS)[int(np.argmin(np.linalg.norm(_PALETTE - mean, axis=-1)))]


def object_mask(frames: np.ndarray, color: str) -> np.ndarray:
    background = np.array(BACKGROUND, np.float64)
    direction = np.array(COLORS[color], np.float64) - background  # [3]
    alpha = (frames.astype(np.float64) - background) @ direction / (direction @ direction)  # [F, H, W]
    mask = np.pad(alpha > 0.5, ((0, 0), (1, 1), (1, 1)))  # [F, H + 2, W + 2]
    height, width = frames.shape[1:3]
    votes = sum(mask[:, i:i + height, j:j + width].astype(np.int8) for i in range(3) for j in range(3))
    return votes >= 5  # [F, H, W]


def detect_shape(mask: np.ndarray) -> str | None:
    fill, balance = [], []
    for m in mask:
        ys, xs = np.nonzero(m)
        if len(ys):
            fill.append(len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
            middle = (ys.min() + ys.max()) / 2
            balance.append((ys < middle).sum() / max((ys > middle).sum(), 1))
    if not fill:
        return None
    if np.mean(balance) < TRIANGLE_BELOW:
        return "triangle"
    return "square" if np.mean(fill) > SQUARE_ABOVE else "circle"


def detect_motion(mask: np.ndarray) -> str | None:
    num_frames, height, width = mask.shape
    t, centroids = [], []
    for f, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(ys):
            t.append(f)
            centroids.append((ys.mean(), xs.mean()))
    if len(t) < 2:
        return None
    slope = np.polyfit(np.array(t, np.float64), np.array(centroids), 1)[0]  # [2] (dy, dx)
    dy, dx = slope * (num_frames - 1)
    if abs(dx) >= abs(dy):
        return None if abs(dx) < MIN_TRAVEL * width else "right" if dx > 0 else "left"
    return None if abs(dy) < MIN_TRAVEL * height else "down" if dy > 0 else "up"


def score_video(frames: np.ndarray, storyboard: Storyboard, frames_per_scene: int) -> dict:
    """Per-scene predictions and accuracies for one video.

    Returns `scenes` (one dict per scene: predicted `color`, `shape`, `motion` and
    `color_ok`, `shape_ok`, `motion_ok`), the accuracies `color`, `shape`, `motion` (fractions
    of scenes) and `consistency`: the fraction of scenes 2..S whose detected colour equals
    both the detected colour of scene 1 and the storyboard's colour, i.e. the first scene's
    colour remembered and right. With a single scene, `consistency` is NaN.
    """
    num_scenes = len(storyboard.scenes)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != num_scenes * frames_per_scene:
        raise ValueError(f"expected frames [{num_scenes * frames_per_scene}, H, W, 3] for "
                         f"{num_scenes} scenes of {frames_per_scene}, got {list(frames.shape)}")
    middle = slice(frames_per_scene // 4, frames_per_scene - frames_per_scene // 4)
    scenes = []
    for k, scene in enumerate(storyboard.scenes):
        clip = frames[k * frames_per_scene:(k + 1) * frames_per_scene]
        color = detect_color(clip, foreground(clip))
        mask = object_mask(clip, color) if color else np.zeros(clip.shape[:3], bool)
        pred = {"color": color, "shape": detect_shape(mask[middle]), "motion": detect_motion(mask)}
        for key in ("color", "shape", "motion"):
            pred[f"{key}_ok"] = pred[key] == getattr(scene, key)
        scenes.append(pred)
    first = scenes[0]["color"]
    later = [s["color"] == first == storyboard.color for s in scenes[1:]]
    return {
        "scenes": scenes,
        **{key: float(np.mean([s[f"{key}_ok"] for s in scenes])) for key in ("color", "shape", "motion")},
        "consistency": float(np.mean(later)) if later else float("nan"),
    }


def score_batch(items: list[tuple[np.ndarray, Storyboard]], frames_per_scene: int) -> dict:
    """Means of the accuracies over videos; NaN consistencies (single scenes) are left out."""
    results = [score_video(frames, storyboard, frames_per_scene) for frames, storyboard in items]
    out = {key: float(np.mean([r[key] for r in results])) for key in ("color", "shape", "motion")}
    consistency = [r["consistency"] for r in results if not np.isnan(r["consistency"])]
    out["consistency"] = float(np.mean(consistency)) if consistency else float("nan")
    out["num_videos"] = len(results)
    return out
