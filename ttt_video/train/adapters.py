"""What a run trains: full, attention q/k/v/o only, TTT only, TTT with attention q/k/v/o (TTT-Video's
later stages, gates included), the temporal layers of Stable Video Diffusion's UNet (its spatial
layers are those of the image model it grew from), or LoRA (through peft).

`apply_adapter(model, name)` freezes everything the mode does not train (and, for LoRA, adds
the low-rank weights); the trainer then optimises exactly the parameters left trainable.
"""

import torch

from ..config import ConfigError

ADAPTERS = ("full", "qkvo", "ttt-qkvo", "ttt-only", "temporal", "lora")
# attention projections: the tiny DiT family's fused qkv and out, then CogVideoX's (diffusers' names)
ATTENTION_MODULES = ("attn.qkv", "attn.out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out")
# diffusers' UNetSpatioTemporalConditionModel: temporal resnets and transformers, their frame
# position embedding, and the learned blend of spatial and temporal paths
TEMPORAL_MODULES = ("temporal_res_block", "temporal_transformer_blocks", "time_pos_embed", "time_mixer")


def _select(model, keep):
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
    return model


def apply_adapter(model, name, lora_rank=8, lora_alpha=8.0):
    if name == "full":
        return _select(model, lambda n: True)
    if name == "qkvo":
        return _select(model, lambda n: any(f".{m}." in f".{n}" for m in ATTENTION_MODULES))
    if name == "ttt-qkvo":
        return _select(model, lambda n: ".ttt." in f".{n}" or any(f".{m}." in f".{n}" for m in ATTENTION_MODULES))
    if name == "ttt-only":
        return _select(model, lambda n: ".ttt." in f".{n}")
    if name == "temporal":
        return _select(model, lambda n: any(f".{m}." in f".{n}" for m in TEMPORAL_MODULES))
    if name == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        _select(model, lambda n: False)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=True,
                            target_modules=[m for m in ATTENTION_MODULES])
        return inject_adapter_in_model(config, model)
    raise ConfigError(f"unknown adapter {name!r}; choose one of {ADAPTERS}")


FROZEN_DTYPES = ("float32", "bfloat16", "float16")


def cast_frozen(model, dtype, mixed_precision):
    """Store the weight matrices the adapter froze in `dtype` ("bfloat16" halves a frozen base's
    memory; autocast computes with them as it would with float32 ones). Trained parameters and
    frozen vectors (norms, biases: few bytes, and some kernels want them in float32) stay float32."""
    if dtype not in FROZEN_DTYPES:
        raise ConfigError(f"unknown train.frozen_dtype {dtype!r}; choose one of {', '.join(FROZEN_DTYPES)}")
    if dtype != "float32" and mixed_precision not in ("bf16", "fp16"):
        raise ConfigError(f"train.frozen_dtype={dtype} needs train.mixed_precision=bf16 or fp16 (autocast)")
    for p in model.parameters():
        if not p.requires_grad and p.dim() >= 2:
            p.data = p.data.to(getattr(torch, dtype))
    return model


def trainable_state_dict(model):
    """The weights a checkpoint must keep to restore what was trained."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}
