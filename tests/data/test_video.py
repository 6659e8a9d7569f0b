import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from ttt_video.data.video import VideoError, cover_size, decode, probe, read_image, to_tensor

from .videos import level, ramp_frames, write_video


@pytest.fixture(scope="module")
def clip24(tmp_path_factory):
    """30 frames at 24 fps; frame k has grey level 8k."""
    return write_video(tmp_path_factory.mktemp("v") / "ramp.mp4", ramp_frames(30), fps=24)


def test_probe_reads_the_header(clip24):
    info = probe(clip24)
    assert (info.width, info.height, info.fps, info.num_frames) == (24, 16, 24.0, 30)
    assert info.duration == pytest.approx(1.25)


def test_decode_downsamples_to_the_target_fps(clip24):
    frames = decode(clip24, fps=8, num_frames=10)
    assert frames.shape == (10, 16, 24, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(level(frames), 8 * np.arange(0, 30, 3), atol=4)  # every third frame


def test_decode_from_an_offset_and_upsampling(clip24):
    frames = decode(clip24, fps=8, num_frames=4, start=0.5)  # source frames 12, 15, 18, 21
    np.testing.assert_allclose(level(frames), [96, 120, 144, 168], atol=4)
    frames = decode(clip24, fps=48, num_frames=6)  # each source frame twice
    np.testing.assert_allclose(level(frames), [0, 0, 8, 8, 16, 16], atol=4)


def test_resize_covers_then_crops_the_centre(clip24):
    assert cover_size(16, 24, 16, 16) == (16, 24) and cover_size(16, 24, 32, 16) == (32, 48)
    square = decode(clip24, fps=24, num_frames=1, size=(16, 16))[0]  # columns 4..19 of 24
    assert square.shape == (16, 16, 3)
    assert square[8, :2, 0].min() > 200 and square[8, :2, 2].max() < 60  # red band, 2 of its 6 columns
    assert square[8, -2:, 2].min() > 200  # blue band on the right
    tall = decode(clip24, fps=24, num_frames=1, size=(32, 16))[0]  # scaled to 32x48, then columns 16..31
    assert tall.shape == (32, 16, 3)
    assert tall[16, :, 0].max() < 60 and tall[16, :, 2].max() < 60  # both bands cropped away
    video = to_tensor(decode(clip24, fps=24, num_frames=3, size=(8, 8)))
    assert video.shape == (3, 3, 8, 8) and video.dtype == torch.float32
    assert -1.0 <= video.min() and video.max() <= 1.0


def test_truncated_corrupt_missing_and_short_requests(tmp_path, clip24):
    write_video(tmp_path / "full.mp4", ramp_frames(30), fps=24, faststart=True)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    assert probe(tmp_path / "cut.mp4").num_frames == 30  # the header still promises every frame
    with pytest.raises(VideoError, match="needed") as e:
        decode(tmp_path / "cut.mp4", fps=24, num_frames=30)
    assert e.value.kind == "truncated"
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 500)
    with pytest.raises(VideoError) as e:
        probe(tmp_path / "junk.mp4")
    assert e.value.kind == "corrupt"
    with pytest.raises(VideoError) as e:
        probe(tmp_path / "nope.mp4")
    assert e.value.kind == "missing"
    with pytest.raises(VideoError, match="ends at 1.25 s") as e:
        decode(clip24, fps=8, num_frames=11)
    assert e.value.kind == "truncated"


def test_every_cut_of_a_video_probes_or_is_refused(tmp_path):
    write_video(tmp_path / "full.mp4", ramp_frames(30), fps=24, faststart=True)
    data = (tmp_path / "full.mp4").read_bytes()
    for n in range(len(data) // 2):  # some cuts keep a video stream whose codec parameters are lost
        (tmp_path / "cut.mp4").write_bytes(data[:n])
        try:
            probe(tmp_path / "cut.mp4")
        except VideoError as e:
            assert e.kind == "corrupt"


def test_read_image_resizes_like_a_frame(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = (0, 255, 0)
    imageio.imwrite(tmp_path / "i.png", image)
    out = read_image(tmp_path / "i.png", (10, 10))  # 10x20, centre 10 columns: all green
    assert out.shape == (10, 10, 3) and out[:, :, 1].min() > 240 and out[:, :, 0].max() < 10
    (tmp_path / "bad.png").write_bytes(b"png?")
    with pytest.raises(VideoError) as e:
        read_image(tmp_path / "bad.png")
    assert e.value.kind == "bad_image"
