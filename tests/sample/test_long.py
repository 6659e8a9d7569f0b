import numpy as np
import pytest
import torch

from ttt_video.data.synthetic import held_out, render
from ttt_video.diffusion.flow import sample_euler
from ttt_video.errors import UserError
from ttt_video.eval.seams import seam_jump
from ttt_video.sample.export import read_video, write_video
from ttt_video.sample.long import check_window
from ttt_video.sample.pipeline import extend, generate


def test_known_frames_are_kept_exactly():
    known = torch.randn(1, 3, 6, 4, 4)
    mask = torch.tensor([True, True, False, False, False, False])
    out = sample_euler(lambda x, t, c: torch.randn_like(x), torch.randn(1, 3, 6, 4, 4), (torch.zeros(1),),
                       (torch.zeros(1),), steps=3, guidance_scale=1.0, progress=False, known=known,
                       known_frames=mask)
    torch.testing.assert_close(out[:, :, :2], known[:, :, :2])


def test_window_checks():
    check_window(24, 8, 8)
    with pytest.raises(UserError, match="multiple of the model's segment length 8"):
        check_window(20, 8, 8)
    with pytest.raises(UserError, match="--overlap must be a multiple of 8 in \\[0, 24\\)"):
        check_window(24, 24, 8)


def test_sliding_window_generate_has_the_requested_length(tmp_path):
    r = generate(["a red circle moves right", "it moves up as a square"], num_frames=37, window=16, overlap=8,
                 steps=2, out=tmp_path / "w.mp4", progress=False)
    assert r.frames.shape[0] == 37 and read_video(r.video).shape[0] == 37


def test_extend_keeps_the_clip_and_adds_frames(tmp_path):
    clip = render(held_out(0, 2), 8, 64, 64)  # 16 frames at twice the model's resolution
    write_video(clip, tmp_path / "in.mp4", fps=8)
    r = extend(tmp_path / "in.mp4", ["it moves left as a circle"], num_frames=10, steps=2, out=tmp_path / "x.mp4",
               progress=False)
    assert r.frames.shape[0] == 26
    small = clip.reshape(16, 32, 2, 32, 2, 3).mean((2, 4))
    assert np.abs(r.frames[:8].astype(float) - small[:8]).mean() < 12  # the opening is the clip (mp4-compressed)


def test_seam_jump():
    frames = np.zeros((6, 2, 2, 3), np.uint8)
    frames[1:] += 2
    frames[2:] += 2
    frames[3:] += 8  # a jump of 8 into frame 3, steps of 2 elsewhere
    frames[4:] += 2
    frames[5:] += 2
    assert seam_jump(frames, [3]) == pytest.approx(4.0)
