import math

import numpy as np
import pytest

from ttt_video.data.synthetic import COLORS, Scene, Storyboard, held_out, render
from ttt_video.eval.scorer import CHANCE, score_batch, score_video

FPS, SIZE = 8, 32
METRICS = ("color", "shape", "motion", "consistency")


def boards(n, num_scenes=4):
    return [held_out(seed, num_scenes) for seed in range(n)]


def recolored(board, color):
    return Storyboard([Scene(color, s.shape, s.motion, s.caption) for s in board.scenes])


def test_ground_truth_scores_high():
    items = [(render(b, FPS, SIZE, SIZE), b) for b in boards(40)]
    result = score_batch(items, FPS)
    assert result["num_videos"] == 40
    for key in METRICS:
        assert result[key] >= 0.95, (key, result)


def test_ground_truth_with_mild_noise_scores_high():
    rng = np.random.default_rng(0)
    items = []
    for b in boards(30):
        video = render(b, FPS, SIZE, SIZE).astype(np.float64) + rng.normal(0, 10, (4 * FPS, SIZE, SIZE, 3))
        items.append((video.clip(0, 255).astype(np.uint8), b))
    result = score_batch(items, FPS)
    for key in METRICS:
        assert result[key] >= 0.95, (key, result)


def test_blurred_ground_truth_scores_high():  # 3x3 box blur
    items = []
    for b in boards(30):
        video = render(b, FPS, SIZE, SIZE).astype(np.float64)
        video = np.pad(video, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(video[:, i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9
        items.append((blurred.round().astype(np.uint8), b))
    result = score_batch(items, FPS)
    for key in METRICS:
        assert result[key] >= 0.95, (key, result)


def test_larger_frames_score_high():
    b = held_out(0, 3)
    result = score_video(render(b, 12, 64, 96), b, 12)
    assert all(result[key] == 1.0 for key in METRICS)


def test_noise_scores_low():
    rng = np.random.default_rng(1)
    items = [(rng.integers(0, 256, (4 * FPS, SIZE, SIZE, 3), dtype=np.uint8), b) for b in boards(30)]
    result = score_batch(items, FPS)
    assert result["motion"] < 0.2
    for key in METRICS:
        assert result[key] < 0.5, (key, result)


def test_forgotten_colour_breaks_consistency_only():
    b = held_out(3, 4)
    wrong = next(c for c in COLORS if c != b.color)
    later = recolored(Storyboard(b.scenes[1:]), wrong)
    video = render(Storyboard(b.scenes[:1] + later.scenes), FPS, SIZE, SIZE)
    result = score_video(video, b, FPS)
    assert result["consistency"] == 0.0
    assert result["color"] == 0.25
    assert result["shape"] == result["motion"] == 1.0
    assert [s["color_ok"] for s in result["scenes"]] == [True, False, False, False]


def test_wrong_colour_everywhere_scores_zero_colour():
    b = held_out(5, 4)
    wrong = next(c for c in COLORS if c != b.color)
    result = score_video(render(recolored(b, wrong), FPS, SIZE, SIZE), b, FPS)
    assert result["color"] == result["consistency"] == 0.0
    assert all(s["color"] == wrong for s in result["scenes"])


def test_empty_and_static_videos_count_as_wrong():
    b = held_out(1, 2)
    empty = np.zeros((2 * FPS, SIZE, SIZE, 3), np.uint8)
    result = score_video(empty, b, FPS)
    assert all(result[key] == 0.0 for key in METRICS)
    assert result["scenes"][0] == {"color": None, "shape": None, "motion": None,
                                   "color_ok": False, "shape_ok": False, "motion_ok": False}
    static = np.repeat(render(b, FPS, SIZE, SIZE)[FPS // 2:FPS // 2 + 1], 2 * FPS, axis=0)
    assert score_video(static, b, FPS)["motion"] == 0.0


def test_single_scene_and_bad_shapes():
    b = held_out(2, 1)
    result = score_video(render(b, FPS, SIZE, SIZE), b, FPS)
    assert math.isnan(result["consistency"]) and result["color"] == 1.0
    assert math.isnan(score_batch([(render(b, FPS, SIZE, SIZE), b)], FPS)["consistency"])
    with pytest.raises(ValueError):
        score_video(render(b, FPS, SIZE, SIZE)[:-1], b, FPS)


def test_chance_levels():
    assert CHANCE["color"] == CHANCE["consistency"] == 1 / len(COLORS)
    assert CHANCE["shape"] == 1 / 3 and CHANCE["motion"] == 1 / 4
