"""A CogVideoX-TTT LoRA checkpoint as `pytorch_lora_weights.safetensors` in diffusers' format, which
`CogVideoXPipeline.load_lora_weights(folder)` loads into diffusers' `CogVideoXTransformer3DModel`.

peft names a LoRA weight `<module>.lora_A.<adapter>.weight` and scales its update by
lora_alpha / r; diffusers expects `transformer.<module>.lora_A.weight` under diffusers' module
paths and, without alphas in the file, scale 1. So the scale is folded into lora_B, and the three
module paths CogVideoX-TTT renames (`DIFFUSERS_RENAMES`) are renamed back. Only the LoRA weights
travel: the TTT layers have no counterpart in diffusers' transformer.
"""

import re
from pathlib import Path

from safetensors.torch import save_file

from .. import config as config_lib
from ..fileio import atomic_file, read_safetensors
from ..models.cogvideox_ttt import DIFFUSERS_RENAMES
from . import checkpoint as ckpt

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight")


def diffusers_lora_state_dict(state, rank, alpha):
    """peft LoRA weights of a CogVideoX-TTT state dict -> diffusers' LoRA keys and scale."""
    out = {}
    for key, value in state.items():
        m = PEFT_KEY.fullmatch(key)
        if m is None:
            continue
        module = f".{m['module']}."
        for theirs, ours in DIFFUSERS_RENAMES:
            module = module.replace(ours, theirs)
        value = value * (alpha / rank) if m["which"] == "B" else value
        out[f"transformer{module}lora_{m['which']}.weight"] = value.contiguous()
    return out


def export_lora(checkpoint, out_dir):
    """Write the LoRA of a `cogvideox-ttt` checkpoint trained with `train.adapter=lora` to
    `out_dir/pytorch_lora_weights.safetensors`; returns its path."""
    path = ckpt.resolve(checkpoint)
    cfg = config_lib.load(path / ckpt.CONFIG_FILE)
    if cfg.model.arch != "cogvideox-ttt" or cfg.train.adapter != "lora":
        raise ckpt.CheckpointError(f"checkpoint {path} is arch {cfg.model.arch} with adapter {cfg.train.adapter}; "
                                   "LoRA export needs arch cogvideox-ttt trained with train.adapter=lora")
    state = read_safetensors(path / ckpt.MODEL_FILE, "checkpoint weights")
    weights = diffusers_lora_state_dict(state, cfg.train.lora_rank, cfg.train.lora_alpha)
    if not weights:
        raise ckpt.CheckpointError(f"checkpoint {path} holds no LoRA weights")
    target = Path(out_dir) / LORA_FILE
    return atomic_file(target, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
