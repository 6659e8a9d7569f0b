"""Which parameters of a CogVideoX-TTT model train at each stage, and their AdamW groups.

TTT-Video's recipe: the first stage (3 s) fine-tunes everything, the new TTT parameters at a
higher learning rate than the pretrained ones; the later stages (9 s ... 63 s), each starting
from the previous stage's checkpoint, train only the TTT layers with their gates and the
attention projections q, k, v, o.
"""

STAGES = ("full", "ttt-qkvo")
ATTENTION = (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v.", ".attn1.to_out.")


def is_ttt(name):
    return ".ttt." in name


def is_no_decay(name, param):
    """Biases, norm weights (and the TTT inner LayerNorm's) and the 1-D gates take no weight decay."""
    return param.dim() < 2 or name.endswith("bias") or "norm" in name or ".ln_" in name


def trainable_parameters(model, stage):
    """Freeze every parameter that `stage` does not train; returns the names of those that train."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(stage == "full" or is_ttt(name) or any(k in name for k in ATTENTION))
        if p.requires_grad:
            trained.append(name)
    return trained


def param_groups(model, lr, ttt_lr, weight_decay):
    """AdamW groups over the parameters that require grad: TTT ones at `ttt_lr`, the rest at `lr`,
    each split into decayed and not decayed. Empty groups are left out."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (is_ttt(name), is_no_decay(name, p))
        groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": ttt_lr if ttt else lr, "weight_decay": 0.0 if no_decay else weight_decay}
            for (ttt, no_decay), params in sorted(groups.items())]
