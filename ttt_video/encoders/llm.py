"""LLM and dual (T5 + LLM) text encoders: captions -> token embeddings `[N, L, D]` and mask `[N, L]`.

`LLMTextEncoder` runs any local transformers model that `AutoModel` loads and returns its last
hidden state. Its width comes from the folder's config.json: `hidden_size`, else the nested
`text_config.hidden_size` (multimodal models), else `d_model`; an explicit `hidden_size` wins.

`DualTextEncoder` puts the two token sequences one after the other: the T5 tokens `[N, L1, d1]`
then the LLM tokens `[N, L2, d2]`, each zero-padded on the feature axis to D = max(d1, d2), giving
`[N, L1 + L2, D]` with the two masks concatenated the same way. Encoders hold no trainable
weights; the model's text embedding (`model.text_dim = D`) learns to read both kinds of token.
"""

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from .text import CachingEncoder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HIDDEN_SIZE_FIELDS = ("hidden_size", "text_config.hidden_size", "d_model")


def hidden_size_from_config(config, folder):
    """The LLM's output width from its config.json contents (a dict)."""
    for name in HIDDEN_SIZE_FIELDS:
        value = config
        for key in name.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int):
            return value
    raise UserError(f"no hidden size in {Path(folder) / 'config.json'} (looked for {', '.join(HIDDEN_SIZE_FIELDS)}); "
                    f"set data.llm_hidden_size")


def torch_dtype(name):
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; available: {', '.join(DTYPES)}")
    return DTYPES[name]


class LLMTextEncoder(CachingEncoder):
    def __init__(self, path, max_length=64, dtype="float32", hidden_size=None, local_files_only=True, device="cpu"):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"LLM folder not found: {folder}")
        for marker in ("config.json", "tokenizer_config.json"):
            if not (folder / marker).is_file():
                raise UserError(f"LLM files missing: {folder / marker}")
        config = json.loads((folder / "config.json").read_text())
        self.dim = hidden_size or hidden_size_from_config(config, folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModel.from_pretrained(folder, local_files_only=local_files_only, dtype=torch_dtype(dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.folder, self.max_length, self.device = folder, max_length, device

    def _encode_new(self, captions):
        batch = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if hidden.shape[-1] != self.dim:
            raise UserError(f"the LLM in {self.folder} gives {hidden.shape[-1]} features, not {self.dim}; "
                            f"set data.llm_hidden_size={hidden.shape[-1]}")
        return hidden, batch["attention_mask"]


class DualTextEncoder(CachingEncoder):
    def __init__(self, t5, llm):
        super().__init__()
        self.t5, self.llm = t5, llm
        self.dim = max(t5.dim, llm.dim)

    def _encode_new(self, captions):
        parts = [encoder.encode(captions) for encoder in (self.t5, self.llm)]
        hidden = torch.cat([F.pad(h, (0, self.dim - h.shape[-1])) for h, _ in parts], dim=1)  # [N, L1 + L2, D]
        return hidden, torch.cat([m for _, m in parts], dim=1)
