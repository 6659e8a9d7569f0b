import json

import numpy as np
import pytest
import torch

from ttt_video.data.synthetic import (
    BACKGROUND, COLORS, HELD_OUT_SEED, MOTIONS, SHAPES, Storyboard, SyntheticStoryboards,
    collate, held_out, make_storyboard, parse_caption, render,
)


def centroid(frame):
    ys, xs = np.nonzero((frame != BACKGROUND).any(-1))
    return ys.mean(), xs.mean()


def test_storyboard_is_deterministic_and_json_roundtrips():
    a, b = make_storyboard(7, 5), make_storyboard(7, 5)
    assert a == b
    assert any(make_storyboard(s, 5) != a for s in range(8, 12))
    assert Storyboard.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_colour_persists_but_only_first_caption_names_it():
    for seed in range(50):
        board = make_storyboard(seed, 4)
        assert len(board.captions) == 4
        assert {s.color for s in board.scenes} == {board.color}
        for k, (scene, caption) in enumerate(zip(board.scenes, board.captions)):
            parsed = parse_caption(caption)
            assert parsed == {"color": scene.color if k == 0 else None,
                              "shape": scene.shape, "motion": scene.motion}
            assert not any(color in caption for color in COLORS) or k == 0


def test_vocabulary_is_covered():
    boards = [make_storyboard(seed, 4) for seed in range(200)]
    assert {b.color for b in boards} == set(COLORS)
    assert {s.shape for b in boards for s in b.scenes} == set(SHAPES)
    assert {s.motion for b in boards for s in b.scenes} == set(MOTIONS)
    assert any(s.shape != b.scenes[0].shape for b in boards for s in b.scenes[1:])


@pytest.mark.parametrize("height,width,fps", [(32, 32, 8), (48, 80, 12)])
def test_render_moves_the_object_clearly_in_its_colour(height, width, fps):
    board = make_storyboard(3, 4)
    video = render(board, fps, height, width)
    assert video.shape == (4 * fps, height, width, 3) and video.dtype == np.uint8
    assert (video[:, 0, 0] == BACKGROUND).all()
    for k, scene in enumerate(board.scenes):
        clip = video[k * fps:(k + 1) * fps]
        fg = (clip != BACKGROUND).any(-1)
        assert set(map(tuple, clip[fg])) == {COLORS[scene.color]}
        ys, xs = np.nonzero(fg[fps // 2])
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert 0.35 <= extent / min(height, width) <= 0.45
        (y0, x0), (y1, x1) = centroid(clip[0]), centroid(clip[-1])
        dy, dx = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[scene.motion]
        travel = (y1 - y0) * dy + (x1 - x0) * dx
        assert travel >= (height if dy else width) / 3
        assert abs((y1 - y0) * dx) + abs((x1 - x0) * dy) < 1


def test_dataset_items():
    ds = SyntheticStoryboards(num_scenes=3, frames_per_scene=8, height=32, width=32, seed=2, size=20)
    assert len(ds) == 20
    item = ds[5]
    assert item["video"].shape == (3, 24, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["captions"] == item["storyboard"].captions and len(item["captions"]) == 3
    assert torch.equal(item["video"], ds[5]["video"])
    assert item["storyboard"] != ds[6]["storyboard"] or item["storyboard"] != ds[7]["storyboard"]
    batch = collate([ds[0], ds[1]])
    assert batch["video"].shape == (2, 3, 24, 32, 32) and len(batch["captions"]) == 2
    with pytest.raises(IndexError):
        ds[20]


def test_held_out_seeds_are_disjoint_from_training():
    assert held_out(4, 3) == make_storyboard(HELD_OUT_SEED + 4, 3)
    with pytest.raises(ValueError):
        SyntheticStoryboards(2, 8, 32, 32, seed=HELD_OUT_SEED // 10, size=10)
