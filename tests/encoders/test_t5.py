import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from ttt_video.encoders.t5 import T5TextEncoder
from ttt_video.errors import UserError

WORDS = "a red blue cat dog runs jumps the over fence".split()


def save_tiny_t5(folder, d_model=16):
    """A random 1-layer T5 encoder and a word-level Unigram tokenizer in a CogVideoX-style folder."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(folder / "text_encoder")
    return tokenizer


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
