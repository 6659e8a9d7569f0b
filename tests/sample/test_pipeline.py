import glob
import json
from pathlib import Path

import pytest

from ttt_video.sample.pipeline import StoryboardError, bundled_checkpoint, plan_segments, read_storyboard


def test_plan_segments():
    assert plan_segments(3, 8) == ([0, 1, 2], 24)
    assert plan_segments(2, 8, num_frames=40) == ([0, 0, 0, 1, 1], 40)
    assert plan_segments(2, 8, num_frames=17) == ([0, 0, 1], 24)
    with pytest.raises(StoryboardError, match="3 captions need at least 3 segments"):
        plan_segments(3, 8, num_frames=10)
    with pytest.raises(StoryboardError, match="no prompts"):
        plan_segments(0, 8)


def test_read_storyboard(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(["a red circle moves up", {"text": "it moves left as a square", "neg_text": "blur"}]))
    assert read_storyboard(p) == ["a red circle moves up", "it moves left as a square"]
    p.write_text('[{"neg_text": "x"}]')
    with pytest.raises(StoryboardError, match="segment 1 has no caption"):
        read_storyboard(p)
    p.write_text("[1, 2")
    with pytest.raises(StoryboardError, match="not valid JSON"):
        read_storyboard(p)
    with pytest.raises(StoryboardError, match="not found"):
        read_storyboard(tmp_path / "missing.json")


def test_the_bundled_model_is_package_data():
    """pyproject's package-data patterns, globbed as setuptools globs them (files only), cover every
    file of the bundled model, so a wheel carries it."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    package = root / "ttt_video"
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ttt_video"]
    shipped = {Path(f).relative_to(package) for pattern in patterns
               for f in glob.glob(str(package / pattern), recursive=True) if Path(f).is_file()}
    bundled = package / "assets" / bundled_checkpoint().name
    assert {"model.safetensors", "config.json"} <= {f.name for f in bundled.iterdir()}
    assert {f.relative_to(package) for f in bundled.iterdir()} <= shipped
