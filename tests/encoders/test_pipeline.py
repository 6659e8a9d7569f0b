import pytest

from ttt_video.config import apply_overrides
from ttt_video.encoders.pipeline import fill_from_pipeline
from ttt_video.errors import UserError
from ttt_video.presets import get_preset


def _folder(root, *files):
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("{}")
    return root


def _cfg(*overrides):
    return apply_overrides(get_preset("cogvideox-5b-ttt-3s"), list(overrides))


def test_empty_settings_take_the_pipeline_components(tmp_path):
    root = _folder(tmp_path, "transformer/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                   "vae/config.json", "scheduler/scheduler_config.json")
    for pretrained in (root, root / "transformer"):
        cfg = _cfg(f"model.pretrained={pretrained}")
        filled = fill_from_pipeline(cfg)
        assert filled.data.t5_model == str(root) and filled.data.vae == str(root / "vae")
        assert filled.diffusion.scheduler == str(root / "scheduler")
        assert cfg.data.vae == "" and cfg.data.t5_model == ""  # the caller's config is left alone
    given = fill_from_pipeline(_cfg(f"model.pretrained={root}", "data.t5_model=T5", "data.vae=identity",
                                    "diffusion.scheduler=S"))
    assert (given.data.t5_model, given.data.vae, given.diffusion.scheduler) == ("T5", "identity", "S")


def test_missing_components_name_the_setting(tmp_path):
    transformer_only = _folder(tmp_path / "a", "transformer/config.json")
    with pytest.raises(UserError, match="data.t5_model is not set and the pipeline folder .* has no "
                                        "text_encoder/config.json and tokenizer; set data.t5_model"):
        fill_from_pipeline(_cfg(f"model.pretrained={transformer_only}"))
    with pytest.raises(UserError, match="data.vae is not set and .* has no vae/config.json; set data.vae"):
        fill_from_pipeline(_cfg(f"model.pretrained={transformer_only}", "data.t5_model=T5"))
    with pytest.raises(UserError, match="data.t5_model is not set and model.pretrained names no pipeline folder"):
        fill_from_pipeline(_cfg())
    filled = fill_from_pipeline(_cfg(f"model.pretrained={transformer_only}", "data.t5_model=T5", "data.vae=V"))
    assert filled.diffusion.scheduler == ""  # no scheduler: the objective uses CogVideoX-5B's values
