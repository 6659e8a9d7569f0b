import imageio.v3 as iio
import numpy as np
import pytest
import torch

from ttt_video.data.synthetic import COLORS, make_storyboard, render
from ttt_video.sample.export import contact_sheet, read_video, video_to_uint8, write_video


def test_video_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(3, 2, 1, 4)
    out = video_to_uint8(x)
    assert out.shape == (2, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert video_to_uint8(torch.zeros(1, 2, 4, 4)).shape == (2, 4, 4, 3)


def test_mp4_roundtrip(tmp_path):
    board = make_storyboard(0, 2)
    frames = render(board, 8, 32, 32)
    path = write_video(frames, tmp_path / "out" / "clip.mp4", fps=8)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["clip.mp4"]
    back = read_video(path)
    assert back.shape == (16, 128, 128, 3)
    small = back[:, 2::4, 2::4].astype(np.int16)  # centres of the 4x4 blocks
    assert np.abs(small - frames).mean() < 6
    centre = small[4, 16, 16]  # the object passes the centre mid-scene
    assert np.abs(centre - COLORS[board.color]).max() < 40


def test_mp4_pads_to_multiples_of_16(tmp_path):
    frames = np.full((3, 20, 30, 3), 200, np.uint8)
    back = read_video(write_video(frames, tmp_path / "odd.mp4", fps=4, upscale=3))
    assert back.shape == (3, 64, 96, 3)
    assert np.abs(back.astype(np.int16) - 200).max() < 8


def test_contact_sheet(tmp_path):
    frames = render(make_storyboard(1, 3), 8, 32, 32)
    path = contact_sheet(frames, tmp_path / "sheet.png", frames_per_scene=8)
    sheet = iio.imread(path)
    assert sheet.shape == (3 * 128 + 2 * 2, 8 * 128 + 7 * 2, 3)
    assert np.array_equal(sheet[130:130 + 128:4, 0:128:4], frames[8])
    grid = iio.imread(contact_sheet(frames[:5], tmp_path / "grid.png"))
    assert grid.shape == (2 * 128 + 2, 3 * 128 + 2 * 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "sheet.png"]
    with pytest.raises(ValueError):
        contact_sheet(frames[:5], tmp_path / "bad.png", frames_per_scene=8)
