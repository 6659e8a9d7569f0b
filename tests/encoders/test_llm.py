import json

import pytest
import torch
from transformers import AutoModel, CLIPVisionConfig, LlamaConfig, LlamaModel, LlavaConfig, LlavaModel

from ttt_video.cli import main
from ttt_video.config import Config
from ttt_video.encoders.llm import DualTextEncoder, LLMTextEncoder, hidden_size_from_config
from ttt_video.encoders.t5 import T5TextEncoder
from ttt_video.encoders.text import build_text_encoder
from ttt_video.errors import UserError
from ttt_video.train.checkpoint import load_model

from ..train.test_trainer import TINY
from .common import save_tiny_t5, tiny_tokenizer

CAPTIONS = ["a red cat runs", "the dog jumps over the fence", "a red cat runs"]


def llama_config(vocab_size, hidden_size):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)


def save_tiny_llm(folder, hidden_size=24):
    """A random 1-layer Llama and the tiny tokenizer in one folder, as a hub LLM folder is laid out."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaModel(llama_config(len(tokenizer), hidden_size)).save_pretrained(folder)
    return tokenizer


def save_tiny_llava(folder, hidden_size=20):
    """A composite config: the width is only in `text_config.hidden_size`."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4, projection_dim=8)
    torch.manual_seed(0)
    LlavaModel(LlavaConfig(vision_config=vision, text_config=llama_config(len(tokenizer), hidden_size),
                           image_token_index=len(tokenizer) - 1)).save_pretrained(folder)


@pytest.mark.parametrize("umt5", [False, True])
def test_t5_and_umt5_load_by_model_type(tmp_path, umt5):
    save_tiny_t5(tmp_path, umt5=umt5)
    encoder = T5TextEncoder(tmp_path, max_length=12)
    assert type(encoder.model).__name__ == ("UMT5EncoderModel" if umt5 else "T5EncoderModel")
    emb, mask = encoder.encode(CAPTIONS)
    assert emb.shape == (3, 12, 16) and mask.sum(1).tolist() == [5, 7, 5]
    assert torch.isfinite(emb).all() and torch.equal(emb[0], emb[2])


def test_llm_gives_the_last_hidden_state_and_its_mask(tmp_path):
    tokenizer = save_tiny_llm(tmp_path)
    encoder = LLMTextEncoder(tmp_path, max_length=10)
    emb, mask = encoder.encode(CAPTIONS)
    assert encoder.dim == 24 and emb.shape == (3, 10, 24) and mask.shape == (3, 10)
    assert mask.sum(1).tolist() == [5, 7, 5]
    batch = tokenizer(CAPTIONS[:1], padding="max_length", max_length=10, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModel.from_pretrained(tmp_path)(**batch).last_hidden_state
    torch.testing.assert_close(emb[0], expected[0], rtol=0, atol=1e-6)


def test_hidden_size_from_nested_config_and_override(tmp_path):
    save_tiny_llava(tmp_path)
    assert "hidden_size" not in json.loads((tmp_path / "config.json").read_text())
    encoder = LLMTextEncoder(tmp_path, max_length=8)
    emb, _ = encoder.encode(CAPTIONS[:1])
    assert encoder.dim == 20 and emb.shape == (1, 8, 20)
    assert hidden_size_from_config({"d_model": 12}, tmp_path) == 12
    with pytest.raises(UserError, match="looked for hidden_size, text_config.hidden_size, d_model"):
        hidden_size_from_config({"text_config": {}}, tmp_path)
    with pytest.raises(UserError, match="gives 20 features, not 32; set data.llm_hidden_size=20"):
        LLMTextEncoder(tmp_path, max_length=8, hidden_size=32).encode(CAPTIONS[:1])


def test_dual_puts_t5_tokens_then_llm_tokens_zero_padded(tmp_path):
    save_tiny_t5(tmp_path / "t5")
    save_tiny_llm(tmp_path / "llm")
    t5, llm = T5TextEncoder(tmp_path / "t5", max_length=6), LLMTextEncoder(tmp_path / "llm", max_length=10)
    emb, mask = DualTextEncoder(t5, llm).encode(CAPTIONS)
    assert emb.shape == (3, 16, 24) and mask.shape == (3, 16)
    t5_emb, t5_mask = t5.encode(CAPTIONS)
    llm_emb, llm_mask = llm.encode(CAPTIONS)
    assert torch.equal(emb[:, :6, :16], t5_emb) and not emb[:, :6, 16:].any()
    assert torch.equal(emb[:, 6:], llm_emb)
    assert torch.equal(mask, torch.cat([t5_mask, llm_mask], 1))


def test_missing_files_and_settings_are_named(tmp_path):
    save_tiny_llm(tmp_path / "llm")
    (tmp_path / "llm" / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match="LLM files missing: .*llm/tokenizer_config.json"):
        LLMTextEncoder(tmp_path / "llm")
    with pytest.raises(UserError, match="LLM folder not found"):
        LLMTextEncoder(tmp_path / "nope")
    data = Config().data
    data.llm_model = str(tmp_path / "llm")
    with pytest.raises(UserError, match="needs data.t5_model"):
        build_text_encoder("t5+llm", 8, data_cfg=data)


def test_train_and_generate_tiny_dit_with_t5_and_llm(tmp_path, capsys):
    save_tiny_t5(tmp_path / "t5")
    save_tiny_llm(tmp_path / "llm")
    sets = [a for s in TINY + ["train.max_steps=2", "train.tensorboard=false", "data.text_encoder=t5+llm",
                               "data.text_max_length=6"] for a in ("--set", s)]
    args = ["train", *sets, "--t5-model", str(tmp_path / "t5"), "--llm-model", str(tmp_path / "llm"),
            "--llm-max-length", "8", "--llm-dtype", "float32", "--local-files-only", "--no-progress"]
    assert main(args + ["--output-dir", str(tmp_path / "bad")]) == 2
    assert "model.text_dim is 384 but the text encoder gives 24; set model.text_dim=24" in capsys.readouterr().err
    assert main(args + ["--set", "model.text_dim=24", "--output-dir", str(tmp_path / "run")]) == 0
    assert "checkpoint-2" in capsys.readouterr().out
    _, cfg = load_model(tmp_path / "run")
    assert (cfg.data.llm_model, cfg.data.llm_max_length) == (str(tmp_path / "llm"), 8)
    out = tmp_path / "v.mp4"
    assert main(["generate", "a red cat runs", "the dog jumps", "--checkpoint", str(tmp_path / "run"),
                 "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()
