import pytest

from ttt_video import config as config_lib
from ttt_video.config import Config, ConfigError, apply_overrides
from ttt_video.presets import get_preset


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["train.max_steps=20", "model.patch_size=1,2,2", "train.lr=3e-4",
                                     "model.seq_mixer=ttt-linear"])
    assert cfg.train.max_steps == 20 and cfg.model.patch_size == (1, 2, 2)
    assert cfg.train.lr == 3e-4 and cfg.model.seq_mixer == "ttt-linear"


@pytest.mark.parametrize("bad,msg", [("train.max_steps=abc", "must be int"), ("train.nope=1", "unknown config key"),
                                     ("max_steps", "not key=value"), ("model.patch_size=1,2", "3 comma")])
def test_bad_overrides(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_overrides(Config(), [bad])


def test_save_load_round_trip(tmp_path):
    cfg = apply_overrides(get_preset("shapes-tiny"), ["data.num_scenes=5"])
    config_lib.save(cfg, tmp_path / "c.json")
    assert config_lib.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_lib.load(tmp_path / "bad.json")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'x'; available: .*shapes-tiny"):
        get_preset("x")


@pytest.mark.parametrize("data,msg", [([5, None], "config file must be a JSON object of keys, got list"),
                                      ({"model": 5}, "config model must be a JSON object of keys, got int")])
def test_config_files_of_the_wrong_shape(tmp_path, data, msg):
    import json

    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=msg):
        config_lib.load(tmp_path / "c.json")


def test_validate_refuses_values_no_run_can_use():
    assert config_lib.validate(get_preset("shapes-tiny")) is not None
    for bad, msg in (("train.lr=inf", "train.lr must be at least 0, got inf"),
                     ("train.lr=0", "train.lr must be above 0"),
                     ("data.i2v_ratio=-1", "data.i2v_ratio must be between 0 and 1"),
                     ("train.grad_accum_steps=0", "train.grad_accum_steps must be at least 1"),
                     ("data.text_encoder=bert", "data.text_encoder must be one of minilm, t5, llm, t5\\+llm"),
                     ("train.checkpoint_parts=true", "set train.grad_checkpointing=true too"),
                     ("train.grad_checkpointing=true,train.offload_checkpoints=true",
                      "train.offload_checkpoints works with model.arch=cogvideox-ttt, got 'tiny-dit'")):
        with pytest.raises(ConfigError, match=msg):
            config_lib.validate(apply_overrides(get_preset("shapes-tiny"), bad.split(",")))
