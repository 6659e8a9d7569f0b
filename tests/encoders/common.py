import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5TokenizerFast, UMT5Config, UMT5EncoderModel

WORDS = "a red blue cat dog runs jumps the over fence".split()


def tiny_tokenizer():
    """A word-level Unigram tokenizer: each word of WORDS is one token, then </s>."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def save_tiny_t5(folder, d_model=16, umt5=False):
    """A random 1-layer T5 (or UMT5) encoder and the tiny tokenizer in a CogVideoX-style folder."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model_class(config).save_pretrained(folder / "text_encoder")
    return tokenizer
