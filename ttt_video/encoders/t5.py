"""T5 text encoder as CogVideoX uses it: captions -> embeddings `[N, 226, D]` and mask `[N, 226]`.
A UMT5 encoder (config `model_type` "umt5", as Wan uses) loads the same way.

Loads from local files only: a CogVideoX pipeline folder (`tokenizer/`, `text_encoder/`) or one
folder holding both. Like diffusers' CogVideoX pipeline, every caption is padded to 226 tokens
and the encoder sees the padding (no attention mask): the pretrained transformer was trained so.
"""

import json
import os
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import safetensors_files
from .text import CachingEncoder

MAX_LENGTH = 226
VOCABULARY = ("spiece.model", "tokenizer.json")  # sentencepiece model, or the fast tokenizer's file


def _find(folder, sub, marker):
    for candidate in (folder / sub, folder):
        if (candidate / marker).is_file():
            return candidate
    raise UserError(f"T5 files missing: {folder / sub / marker}")


class T5TextEncoder(CachingEncoder):
    def __init__(self, path, max_length=MAX_LENGTH, device="cpu", dtype=torch.float32):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"T5 folder not found: {folder}")
        tokenizer_dir = _find(folder, "tokenizer", "tokenizer_config.json")
        if not any((tokenizer_dir / name).is_file() for name in VOCABULARY):
            raise UserError(f"T5 files missing: {tokenizer_dir / VOCABULARY[0]} (or {VOCABULARY[1]}), the "
                            "tokenizer's vocabulary")
        model_dir = _find(folder, "text_encoder", "config.json")
        safetensors_files(model_dir, "model.safetensors")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except (ImportError, ValueError) as e:
            raise UserError(f"cannot load the tokenizer in {tokenizer_dir} ({e}); a sentencepiece-only "
                            f"tokenizer needs `pip install sentencepiece`") from None
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        model_class = UMT5EncoderModel if model_type == "umt5" else T5EncoderModel
        self.model = model_class.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.dim = self.model.config.d_model
        self.max_length, self.device = max_length, device

    def _encode_new(self, captions):
        batch = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        return self.model(batch["input_ids"].to(self.device))[0], batch["attention_mask"]
