import pytest

from ttt_video.config import Config, apply_overrides
from ttt_video.presets import get_preset
from ttt_video.sample.pipeline import generate
from ttt_video.train.trainer import train

from .test_trainer import TINY

FAMILIES = {
    "sora-tiny": ["model.arch=sora-dit", "model.attention_type=st"],
    "titans-tiny": ["model.arch=titans-dit", "model.num_memory_tokens=2", "model.num_persistent_tokens=2",
                    "model.memory_chunk_size=16"],
}


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_family_trains_and_generates(preset, tmp_path):
    assert get_preset(preset).model.arch == FAMILIES[preset][0].split("=")[1]
    cfg = apply_overrides(Config(), TINY + FAMILIES[preset] + ["train.max_steps=2", "train.tensorboard=false"])
    last = train(cfg, tmp_path / "run", progress=False)
    assert last.name == "checkpoint-2"
    result = generate(["a red circle moves right", "it moves up as a square"], checkpoint=tmp_path / "run",
                      num_frames=7, steps=2, out=tmp_path / "video.mp4", progress=False)
    assert result.video.exists() and result.sheet.exists()
    assert result.frames.shape == (7, 16, 16, 3)
