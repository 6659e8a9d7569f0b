import pytest
import torch
from transformers import T5EncoderModel

from ttt_video.encoders.t5 import T5TextEncoder
from ttt_video.errors import UserError

from .common import save_tiny_t5


def test_t5_pads_to_226_and_matches_the_encoder(tmp_path):
    tokenizer = save_tiny_t5(tmp_path)
    encoder = T5TextEncoder(tmp_path)
    emb, mask = encoder.encode(["a red cat runs", "the dog jumps over the fence", "a red cat runs"])
    assert emb.shape == (3, 226, 16) and mask.shape == (3, 226)
    assert mask[0].sum() == 5 and mask[1].sum() == 7  # words + </s>
    assert torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])
    ids = tokenizer(["a red cat runs"], padding="max_length", max_length=226, return_tensors="pt")["input_ids"]
    model = T5EncoderModel.from_pretrained(tmp_path / "text_encoder")
    with torch.no_grad():
        expected = model(ids)[0]
    torch.testing.assert_close(emb[0], expected[0], rtol=0, atol=1e-6)


def test_missing_t5_files_are_named(tmp_path):
    save_tiny_t5(tmp_path)
    (tmp_path / "text_encoder" / "config.json").unlink()
    with pytest.raises(UserError, match="text_encoder/config.json"):
        T5TextEncoder(tmp_path)
    with pytest.raises(UserError, match="T5 folder not found"):
        T5TextEncoder(tmp_path / "nope")
