import json

import numpy as np
import pytest
import torch

from ttt_video.config import DataConfig
from ttt_video.data.buckets import Bucket
from ttt_video.data.dataset import EpochReport, ManifestDataset, collate, task_for
from ttt_video.data.manifest import read_manifest
from ttt_video.data.report import DataError, SkipReport
from ttt_video.data.synthetic import SyntheticStoryboards
from ttt_video.errors import UserError

from .videos import level, make_dataset, ramp_frames, write_video


def data_cfg(manifest, **kw):
    return DataConfig(**{"source": "manifest", "manifest": str(manifest), "fps": 8, "frames_per_scene": 4,
                         "num_scenes": 2, "height": 16, "width": 24, "buckets": "16x24,24x16", **kw})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def dataset(manifest):
    return ManifestDataset(data_cfg(manifest))


def test_bad_data_is_skipped_once_each_and_counted(manifest, capsys):
    ds = ManifestDataset(data_cfg(manifest))
    err = capsys.readouterr().err
    assert err.count("warning: skipped") == 5
    assert "malformed manifest line: manifest.jsonl:4: not JSON" in err
    assert "missing file: missing.mp4" in err and "corrupt video: corrupt.mp4" in err
    assert "clip too short: short.mp4: 0.38 s, a segment needs 0.50 s" in err
    assert "unreadable image: bad.png" in err
    assert ds.report.counts() == {"bad_line": 1, "missing": 1, "corrupt": 1, "too_short": 1, "bad_image": 1}
    assert ds.report.summary() == ("skipped 5 (1 malformed manifest line, 1 missing file, 1 corrupt video, "
                                   "1 clip too short, 1 unreadable image)")


def test_clips_are_cut_into_segment_windows_and_bucketed(dataset):
    # a: 3 s, 3 captions -> segments [0, 1] + [2]; b (portrait): 2.5 s -> 2 + 2 + 1;
    # c: 1.5 s -> 2 + 1; trunc: the header says 3.75 s -> 2 + 2 + 2 + 1
    assert [str(b) for b in dataset.buckets] == [
        "16x24x2", "16x24x1", "24x16x2", "24x16x2", "24x16x1", "16x24x2", "16x24x1",
        "16x24x2", "16x24x2", "16x24x2", "16x24x1"]
    a0, a1 = dataset[0], dataset[1]
    assert a0["captions"] == ["first", "second"] and a1["captions"] == ["third"]
    assert a0["video"].shape == (3, 8, 16, 24) and a1["video"].shape == (3, 4, 16, 24)
    frames = ((a1["video"].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
    np.testing.assert_allclose(level(frames), 8 * np.arange(8, 12), atol=4)  # segment 3: frames 8..11
    b = dataset[2]
    assert b["video"].shape == (3, 8, 24, 16) and b["captions"] == ["portrait", "portrait"]


def test_i2v_conditions(dataset, manifest):
    a, b = dataset[0], dataset[2]
    assert a["task"] == "i2v" and a["cond_image"].shape == (3, 1, 16, 24)
    torch.testing.assert_close(a["cond_image"], torch.full((3, 1, 16, 24), 200 / 127.5 - 1), atol=0.02, rtol=0)
    assert b["task"] == "t2v" and not b["cond_image"].any()  # forced t2v despite any ratio
    always = ManifestDataset(data_cfg(manifest, i2v_ratio=1.0))
    c = always[5]
    assert c["task"] == "i2v"
    torch.testing.assert_close(c["cond_image"], c["video"][:, :1])  # the first frame
    assert always[2]["task"] == "t2v"
    draws = [task_for(None, 0.3, 0, d) for d in range(2000)]
    assert draws.count("i2v") / len(draws) == pytest.approx(0.3, abs=0.04)
    assert draws == [task_for(None, 0.3, 0, d) for d in range(2000)]


def test_truncated_clip_is_replaced_within_its_bucket_and_reported(dataset):
    item = dataset[8]  # trunc.mp4 from 1 s: the file ends at 1.38 s
    assert [s.kind for s in item["skipped"]] == ["truncated", "truncated"]
    assert all(s.where == "trunc.mp4" for s in item["skipped"])
    assert item["video"].shape == (3, 8, 16, 24)  # the next good item of bucket 16x24x2 (clip a)
    assert item["captions"] == ["first", "second"]
    assert dataset[7]["skipped"] == []  # the first second of trunc.mp4 is intact


def test_collate_and_epoch_summary(dataset, capsys):
    batch = collate([dataset[8], dataset[5]])
    assert batch["video"].shape == (2, 3, 8, 16, 24) and batch["cond_image"].shape == (2, 3, 1, 16, 24)
    assert batch["captions"] == [["first", "second"], ["short wide", "short wide"]]
    assert batch["task"] == ["i2v", "t2v"] and len(batch["skipped"]) == 2
    sampler = dataset.batch_sampler(0, 12, 2)
    report = EpochReport(dataset, sampler)
    capsys.readouterr()
    for step in range(1, sampler.steps_per_epoch + 1):
        report.update(step, batch if step == 1 else {"skipped": []})
    out = capsys.readouterr()
    assert f"epoch 1: {len(dataset)} items, skipped 6 (" in out.out and "1 truncated video" in out.out
    assert out.err.count("warning: skipped truncated video: trunc.mp4") == 1
    synthetic = collate([SyntheticStoryboards(2, 4, 16, 16)[i] for i in range(2)])
    assert synthetic["video"].shape == (2, 3, 8, 16, 16) and len(synthetic["storyboard"]) == 2


def test_metadata_json_and_malformed_entries(tmp_path, capsys):
    write_video(tmp_path / "v.mp4", ramp_frames(8), fps=8)
    entries = [{"video_path": "v.mp4", "caption": "hello"}, {"video_path": "v.mp4"},
               {"video": "v.mp4", "captions": []}, {"video": "v.mp4", "caption": "x", "task": "v2v"}, 7]
    (tmp_path / "metadata.json").write_text(json.dumps(entries))
    report = SkipReport()
    records = read_manifest(tmp_path / "metadata.json", report)
    assert [(r.video, r.captions) for r in records] == [("v.mp4", ("hello",))]
    msgs = [str(s) for s in report.skips.values()]
    assert msgs == ['malformed manifest line: metadata.json[1]: needs exactly one of "caption" and "captions"',
                    'malformed manifest line: metadata.json[2]: "captions" must be a non-empty list of strings',
                    "malformed manifest line: metadata.json[3]: \"task\" must be \"t2v\" or \"i2v\", got 'v2v'",
                    "malformed manifest line: metadata.json[4]: expected an object, got int"]
    ds = ManifestDataset(data_cfg(tmp_path / "metadata.json", buckets=""))
    assert ds.buckets == [Bucket(16, 24, 2)] and ds[0]["captions"] == ["hello", "hello"]


def test_strict_makes_bad_data_an_error(manifest):
    with pytest.raises(DataError, match="manifest.jsonl:4.*strict"):
        ManifestDataset(data_cfg(manifest, strict=True))


def test_segments_sharing_a_frame(tmp_path):
    """CogVideoX's layout: S segments of 5 frames sharing one with each neighbour are 4 S + 1 frames,
    and the next window starts on the last frame of the previous one."""
    write_video(tmp_path / "a.mp4", ramp_frames(24), 8)  # 3 s: (24 - 1) // 4 = 5 segments
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "ramp"}) + "\n")
    ds = ManifestDataset(data_cfg(tmp_path / "m.jsonl", frames_per_scene=5, segment_overlap=1, buckets=""))
    assert [str(b) for b in ds.buckets] == ["16x24x2", "16x24x2", "16x24x1"]
    for i, first in enumerate((0, 8, 16)):
        video = ds[i]["video"]
        assert video.shape[1] == 4 * ds.buckets[i].segments + 1
        frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
        np.testing.assert_allclose(level(frames), 8 * np.arange(first, first + video.shape[1]), atol=4)
    with pytest.raises(UserError, match="segment_overlap must be at least 0 and below data.frames_per_scene"):
        ManifestDataset(data_cfg(tmp_path / "m.jsonl", frames_per_scene=5, segment_overlap=5))


def test_scene_markers_delimit_each_window(tmp_path):
    """Five segments in windows of 2, 2 and 1, a new scene at segment 3: every window opens a scene
    (as a sampled video does), a transition closes the one before it, and the window's end closes
    the last; markers off, the captions stay as they are."""
    write_video(tmp_path / "a.mp4", ramp_frames(24), 8)  # (24 - 1) // 4 = 5 segments of 5 frames sharing one
    line = {"video": "a.mp4", "captions": list("abcde"), "transitions": [False, False, False, True, False]}
    bad = [{"video": "a.mp4", "caption": "x", "transitions": [True]},
           {"video": "a.mp4", "captions": ["x", "y"], "transitions": [True]},
           {"video": "a.mp4", "captions": ["x"], "transitions": ["yes"]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in [line, *bad]) + "\n")
    cfg = dict(frames_per_scene=5, segment_overlap=1, buckets="")
    ds = ManifestDataset(data_cfg(tmp_path / "m.jsonl", scene_markers=True, **cfg))
    assert [ds.captions(i) for i in range(3)] == [["<start_scene> a", "b <end_scene>"],
                                                  ["<start_scene> c <end_scene>", "<start_scene> d <end_scene>"],
                                                  ["<start_scene> e <end_scene>"]]
    assert sorted(str(s).split(": ")[-1] for s in ds.report.skips.values()) == [
        '"transitions" must be a list of true/false, one per caption',
        '"transitions" needs "captions" and one entry per caption',
        '"transitions" needs "captions" and one entry per caption']
    plain = ManifestDataset(data_cfg(tmp_path / "m.jsonl", **cfg))
    assert [plain.captions(i) for i in range(3)] == [["a", "b"], ["c", "d"], ["e"]]
    assert [w.key for w in plain.items] == [w.key for w in ds.items]  # the cache separates them by its settings
