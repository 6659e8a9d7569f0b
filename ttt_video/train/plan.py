"""Peak GPU memory of a training step, and the micro-batch, accumulation and checkpointing that fit.

    peak = weights + optimizer + EMA + S(b, D)

    weights      4 bytes x every parameter (fp32 master weights), 2 for frozen ones stored in
                 bf16/fp16 (train.frozen_dtype: frozen weight matrices)
    optimizer    8 x trainable parameters (AdamW's two fp32 moments; the adapter decides what is
                 trainable: LoRA and ttt-only train few)
    EMA          4 x trainable, with train.ema_decay > 0
    S(b, D)      the step: the peak, over one forward and backward of micro-batch b through D
                 blocks, of the bytes held by live tensors other than parameters: activations,
                 the gradients (4 x trainable once all have landed) and, with bf16/fp16, autocast's
                 half-precision copies of the trainable weights (cached through the forward; the
                 trainer runs backward outside autocast)

Gradients and activations are not added up: the gradients land during backward while the blocks'
saved inputs are freed, so in a deep model the step's peak holds all of one and little of the
other (a 42-block CogVideoX-5B step at 9 s on an H200: 81.2 GiB measured, where adding the
gradients and autocast copies to the activation peak gave 99.1).

S is measured, not guessed: the model is built on the `meta` device (shapes, no data) and one
forward and backward runs under a dispatch mode that adds each new tensor's storage when an op
creates it and subtracts it when Python frees it. Attention runs through a stand-in that keeps
what a fused (flash) kernel keeps (q, k, v, the output and a float32 log-sum-exp per query), since
the meta device would otherwise take the math path and count a full attention matrix; the TTT
scan likewise runs through a stand-in keeping what its kernels keep (inputs, output, and the
inner weights of every item at every 16th mini-batch; in backward also their scratch: the inner
states recomputed for a checkpoint group or two, TTT-MLP's per-step buffers), and the TTT layer's
q, k, v preparation and head merge through stand-ins keeping what its fused kernels keep on CUDA
(the projection; the heads) where a GPU run uses them. With bf16/fp16, CUDA autocast is emulated
above autograd: matrix products and attention take half precision inputs (casting float32 ones,
as autocast does), norms and softmax float32, other ops their inputs' dtype, so the saved tensors
have the dtypes a GPU run saves. Blocks are identical, so S is linear in D past the first block
(the first block can differ: with a frozen stem its input needs no gradient): each block adds its
saved input or its gradients, whichever is larger, since the peak falls where the one or the other
is complete. It is not linear in b (the gradients do not grow with it), so S is simulated at
every micro-batch b the plan compares, at D in {2, 3}, and extrapolated:

    S(b, D) = S(b, 2) + (D - 2) (S(b, 3) - S(b, 2))

Gradient checkpointing keeps only each block's input and recomputes one block at a time, which
the simulation sees because it runs the model's own checkpointed path. For CogVideoX-TTT the plan
also compares the offloading of the blocks' inputs (`train.offload_checkpoints`: an offloaded
input leaves the count until its block's backward, and its bytes are the `host` column) and that
with the part-wise recompute (`train.checkpoint_parts`).

Not counted: the CUDA context and allocator fragmentation (a plan fills at most 90% of the
card), the text encoder and VAE (the trainer can use precomputed caches), and data-parallel
buffers (DDP keeps one more gradient-sized copy; FSDP divides weights, gradients and optimizer
by the GPU count). `measure` runs real training steps on a CUDA device and reads the
allocator's peak, to check the estimate.
"""

import contextlib
import dataclasses
import functools
import re
import sys
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import UserError
from ..models import build_model
from ..ops import memo
from ..ops.ttt.buffers import (linear_backward_scratch, mlp_backward_padding, mlp_backward_scratch,
                               mlp_hopper_backward_scratch)
from .adapters import apply_adapter, cast_frozen

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEADROOM = 0.9  # share of the card a plan may fill: the CUDA context and fragmentation take the rest
UNITS = {"": 2**30, "G": 2**30, "GB": 2**30, "GIB": 2**30, "M": 2**20, "MB": 2**20, "MIB": 2**20,
         "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_memory(text):
    """'24GB', '24GiB', '80G', '24000MB' or '24' (GB) -> bytes. GB means 2**30 bytes, as GPU
    makers' "24 GB" does."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--gpu-memory must be a size like 24GB, 80GiB or 24000MB, got {text!r}")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


@dataclass
class Estimate:
    batch_size: int
    checkpointing: bool
    weights: int
    optimizer: int
    ema: int
    step: int  # S(b, D): activations, gradients and autocast copies at their joint peak
    host: int = 0  # pinned host memory of offloaded block inputs (train.offload_checkpoints), not in total
    parts: bool = False  # with checkpointing: train.checkpoint_parts
    offload: bool = False  # with checkpointing: train.offload_checkpoints

    @property
    def total(self):
        return self.weights + self.optimizer + self.ema + self.step

    @property
    def recompute(self):
        """(grad_checkpointing, checkpoint_parts, offload_checkpoints)."""
        return self.checkpointing, self.parts, self.offload

    @property
    def recompute_name(self):
        if not self.checkpointing:
            return "off"
        return "+".join(["on"] + [n for n, v in (("parts", self.parts), ("offload", self.offload)) if v])


# (grad_checkpointing, checkpoint_parts, offload_checkpoints) settings plan compares, fastest first
RECOMPUTE = ((False, False, False), (True, False, False), (True, False, True), (True, True, True))


def recompute_settings(cfg):
    """Without and with gradient checkpointing; for CogVideoX-TTT also with the blocks' inputs
    offloaded, and offloaded and recomputed part by part."""
    return RECOMPUTE if cfg.model.arch == "cogvideox-ttt" else RECOMPUTE[:2]


def with_recompute(cfg, parts, offload):
    """A copy of `cfg` with `train.checkpoint_parts` and `train.offload_checkpoints` set."""
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))
    out.train.checkpoint_parts, out.train.offload_checkpoints = parts, offload
    return out


class _LiveBytes(TorchDispatchMode):
    """Bytes held by live tensor storages created inside the mode, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted = {}  # id(storage) -> [bytes, still counted]

    def add(self, t):
        st = t.untyped_storage()
        if id(st) in self.counted:
            return
        entry = self.counted[id(st)] = [st.nbytes(), True]
        self.live += entry[0]
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, id(st), entry)

    def ignore(self, t):
        """Never count `t`'s storage (parameters: views of them are not new memory)."""
        self.counted[id(t.untyped_storage())] = [0, False]

    def _free(self, key, entry):
        if entry[1]:
            self.live -= entry[0]
        if self.counted.get(key) is entry:
            del self.counted[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


class _FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of a flash-attention kernel, no arithmetic. Like `ops.attention.attend`, it
    keeps its results for a checkpointed part's recompute where `ops.memo` asks."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = memo.kept_or(lambda: (_like_q(q, v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)))
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _like_q(q, dv):
    """An attention output of head dim dv in q's layout, as cuDNN's kernels give it."""
    return torch.empty_like(q) if q.shape[-1] == dv else q.new_empty(*q.shape[:-1], dv)


TTT_CHECKPOINT_GROUP = 16  # mini-batches between the inner states the TTT kernels keep


class _TTTScan(torch.autograd.Function):
    """Shapes and saved tensors of the TTT kernels (ops/ttt), no arithmetic: the inputs, the output
    and the per-item inner weights at every `TTT_CHECKPOINT_GROUP`-th mini-batch; in backward also
    the scratch the kernels hold while they run (`_ttt_backward_scratch`). Like the kernels' op, it keeps
    its results for a checkpointed TTT pass's recompute where `ops.memo` asks."""

    @staticmethod
    def forward(ctx, mini_batch_size, q, k, v, eta, *weights):
        B, _, T, _ = q.shape
        groups = -(-T // (mini_batch_size * TTT_CHECKPOINT_GROUP))
        out, states = memo.kept_or(lambda: (torch.empty_like(q), [w.new_empty(groups, B, *w.shape) for w in weights]))
        ctx.save_for_backward(q, k, v, eta, out, *states, *weights)
        ctx.num_weights = len(weights)
        ctx.mini_batch_size = mini_batch_size
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        inputs, weights = saved[:4], saved[len(saved) - ctx.num_weights:]
        scratch = _ttt_backward_scratch(inputs[0], weights[:-2], ctx.mini_batch_size)  # less the LayerNorm's
        grads = (None, *(torch.empty_like(t) for t in inputs), *(torch.empty_like(w) for w in weights))
        del scratch
        return grads


def _ttt_backward_scratch(q, weights, mini_batch_size):
    """The buffers the TTT kernels' backward allocates besides the gradients it returns (`_TTT.backward`
    in ops/ttt/triton.py), for the inner weights `weights` (TTT-MLP's four or TTT-Linear's two). In
    float32: the adjoint of each chain's inner state; for TTT-Linear the window slots of `ops.ttt.buffers`
    (the recomputed states and what the queries' halves leave the keys' halves, two windows' worth) and
    LayerNorm gradient rows; for TTT-MLP the shapes the kernels take from there (the recomputed states, their W1 and
    W2 in bf16 for 16-bit q, what its queries' half leaves the keys' half, its step scratch, and q, k, v
    and the output gradient padded to a multiple of 16 tokens): the Hopper kernels' where they run (bf16,
    head dim and mini-batch 64, `_hopper_gpu`), else the portable kernel's."""
    B, H, T, D = q.shape
    chains, group, bs = B * H, TTT_CHECKPOINT_GROUP, mini_batch_size
    state = sum(w.numel() // w.shape[0] for w in weights)  # floats of one chain's inner state

    def f32(*shape):
        return q.new_empty(shape, dtype=torch.float32)

    if len(weights) == 2:  # the adjoint; two sets of window slots; LayerNorm gradient rows
        *slots, rows = linear_backward_scratch(chains, -(-T // (bs * group)), group, bs, D)
        return [f32(chains, state), *(f32(*shape) for shape in slots * 2), f32(*rows), f32(2, chains, D),
                f32(2, chains, D)]
    low = q.dtype != torch.float32  # bf16 products: the recomputed W1 and W2 are kept in bf16
    if low and D == 64 and bs == 64 and _hopper_gpu():
        shapes = mlp_hopper_backward_scratch(chains, -(-T // (bs * group)), group, D, weights[0].shape[-1], bs)
        scratch = [f32(chains, state), q.new_empty(shapes["low"], dtype=torch.bfloat16),
                   *(f32(*shapes[name]) for name in ("b1", "b2", "par", "run", "ln"))]
    else:
        programs, primal = _mlp_backward_build(chains, D, bs)
        states, par, scr = mlp_backward_scratch(chains, programs, group, bs, D, weights[0].shape[-1], low, primal)
        matrices = sum(w.numel() // w.shape[0] for w in weights if w.shape[-2] > 1)  # W1, W2 (b1, b2: [1, n])
        scratch = [f32(chains, state), q.new_empty(*states, matrices, dtype=torch.bfloat16 if low else torch.float32),
                   f32(*states, state - matrices), f32(*par), f32(*scr)]
    if pad := mlp_backward_padding(T):
        scratch += [q.new_empty(chains, T + pad, D) for _ in range(4)]
    return scratch


SMS_WITHOUT_GPU = 132  # multiprocessors assumed where the plan runs without a GPU (an H100's or H200's)


def _hopper_gpu():
    """Whether the TTT-MLP kernels take their Hopper path (`ops/ttt/hopper.py`) on the GPU planned for: this
    one's compute capability is 9.0, or, without a GPU, the H100 or H200 the plan assumes."""
    return torch.cuda.get_device_capability() == (9, 0) if torch.cuda.is_available() else True


def _mlp_backward_build(chains, head_dim, mini_batch_size):
    """(programs a chain, primal form) of the TTT-MLP backward kernel. Two programs where all of them are
    resident at once (two 4-warp programs an SM at head dim and mini-batch <= 64, else one program of 8
    or 16 warps), else one; the primal form in the 4-warp builds (the model's TTT layers are not causal),
    which run where the chain has two programs or where only they keep every chain resident (at most two
    chains an SM). The kernels decide it from the compiled build (`_mlp_launch` and `_mlp_primal` in
    ops/ttt/triton.py); this is that rule for the current GPU, or for `SMS_WITHOUT_GPU` multiprocessors
    without one."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else SMS_WITHOUT_GPU
    narrow = head_dim <= 64 and mini_batch_size <= 64
    programs = 2 if 2 * chains <= (2 if narrow else 1) * sms else 1
    return programs, narrow and chains <= 2 * sms


class _InnerInputs(torch.autograd.Function):
    """Shapes and saved tensors of the TTT layer's fused q, k, v preparation (`ops.ttt.layer_io`):
    it keeps the projection and recomputes the rest in backward."""

    @staticmethod
    def forward(ctx, qkv, num_heads):
        ctx.save_for_backward(qkv)
        B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        return tuple(qkv.new_empty(B, num_heads, L, D // num_heads) for _ in range(3))

    @staticmethod
    def backward(ctx, *grads):
        return torch.empty_like(ctx.saved_tensors[0]), None


class _MergeHeads(torch.autograd.Function):
    """Shapes and saved tensors of the TTT layer's fused head merge and post-norm: it keeps the heads."""

    @staticmethod
    def forward(ctx, o):
        ctx.save_for_backward(o)
        B, H, L, Dh = o.shape
        return o.new_empty(B, L, H * Dh)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(ctx.saved_tensors[0])


class _NormRope(torch.autograd.Function):
    """Shapes and saved tensors of attention's fused q / k LayerNorm and RoPE: it keeps the projection's rows
    and gives the heads of each token together (`[B, H, L, Dh]` over `[B, L, H, Dh]` memory)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        B, H, L, Dh = x.shape
        return x.new_empty(B, L, H, Dh).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(ctx.saved_tensors[0])


class _KeepsInputs(torch.autograd.Function):
    """Shapes and saved tensors of a fused step that keeps the inputs it takes a gradient at and gives one
    output shaped as the first: the adaLN (its input, shift and scale)."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return inputs[0].new_empty(inputs[0].shape)

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


class _GatedResidual(torch.autograd.Function):
    """Shapes and saved tensors of the fused gated residual x + gate y: it keeps the gate, and y where the gate
    takes a gradient."""

    @staticmethod
    def forward(ctx, x, gate, y):
        ctx.save_for_backward(gate, y if ctx.needs_input_grad[1] else None)
        ctx.y_dtype = y.dtype
        return x.new_empty(x.shape)

    @staticmethod
    def backward(ctx, grad):
        gate, y = ctx.saved_tensors
        dgate = None if y is None else torch.empty_like(gate)
        # x's gradient is the output's, as the kernel's
        return grad, dgate, grad.new_empty(grad.shape, dtype=ctx.y_dtype)


def _layer_kernels(fn, x, head_dim=None):
    """What `layers.fusion.fused` gives on a CUDA device with Triton: the layer kernels where it fuses
    (`layers.fusion.fuses`) at a power-of-two head dim; else `fn` itself."""
    from ..layers import dit, fusion, rope, ttt

    if not fusion.fuses(x) or (head_dim is not None and head_dim & (head_dim - 1)):
        return fn
    if fn is dit.modulated_norm:
        return lambda x, weight, bias, shift, scale, eps=1e-5: _KeepsInputs.apply(x, shift, scale)
    if fn is dit.gated_residual:
        return _GatedResidual.apply
    if fn is ttt._inner_inputs:
        return lambda qkv, cos, sin, ln_weight, ln_bias, num_heads, reverse=False: _InnerInputs.apply(qkv, num_heads)
    if fn is rope.norm_rope:
        return lambda x, weight, bias, cos=None, sin=None, eps=1e-6: _NormRope.apply(x)
    return lambda o, weight, bias, reverse=False: _MergeHeads.apply(o)


class _Autocast(TorchFunctionMode):
    """CUDA autocast, emulated above autograd (the meta device has none): matrix products run in
    `dtype`, with the casts of trainable parameters made once and kept in `cached` (autocast's
    cache, which lives as long as the outermost autocast region); norms and softmax run in float32;
    everything else in its inputs' dtype."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype, self.cached = dtype, {}

    def lower(self, t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == self.dtype:
            return t
        if isinstance(t, nn.Parameter) and t.requires_grad:
            if id(t) not in self.cached:
                self.cached[id(t)] = t.to(self.dtype)
            return self.cached[id(t)]
        return t.to(self.dtype)

    @staticmethod
    def full(t):
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOWER_PRECISION:
            args, kwargs = tree_map(self.lower, (args, kwargs))
        elif func in FULL_PRECISION:
            args, kwargs = tree_map(self.full, (args, kwargs))
        return func(*args, **kwargs)


LOWER_PRECISION = {F.linear, F.conv2d, F.conv3d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                   torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum}
FULL_PRECISION = {F.layer_norm, F.group_norm, F.normalize, F.softmax, F.log_softmax, torch.softmax,
                  torch.Tensor.softmax, torch.norm, torch.Tensor.norm, F.mse_loss}


def _fused_attention(q, k, v, attn_mask=None, dtype=None, **_):
    if dtype is not None:  # autocast runs attention in half precision
        q, k, v = (t.to(dtype) for t in (q, k, v))
    return _FusedAttention.apply(q, k, v)


def _ttt_scan(q, k, v, eta, *weights, mini_batch_size=64, **_):
    return _TTTScan.apply(mini_batch_size, q, k, v, eta, *weights)


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


@contextlib.contextmanager
def _stand_ins(autocast=None, host=None):
    """Route every attention and TTT op the package calls through the stand-ins above. With an
    `_Autocast`, attention runs in its dtype and each checkpointed block recomputes under an
    `_Autocast` of its own (backward does not see the caller's function modes; on CUDA the
    recompute is an autocast region of its own too, its cache dropped at its end). With a list
    `host`, the bytes of every set of block inputs offloaded to host memory are appended to it."""
    attention = functools.partial(_fused_attention, dtype=autocast and autocast.dtype)
    replaced = {"scaled_dot_product_attention": attention, "attend": attention, "ttt_mlp": _ttt_scan,
                "ttt_linear": _ttt_scan, "fused": _layer_kernels}
    if host is not None:
        from ..models import cogvideox_ttt

        def host_copies(*tensors, real=cogvideox_ttt.host_copies, **kwargs):
            host.append(sum(t.numel() * t.element_size() for t in tensors))
            return real(*tensors, **kwargs)

        replaced["host_copies"] = host_copies
    if autocast is not None:
        def checkpoint(fn, *args, context_fn=torch.utils.checkpoint.noop_context_fn, **kwargs):
            def contexts():
                first, again = context_fn()
                return first, _both(again, _Autocast(autocast.dtype))
            return torch.utils.checkpoint.checkpoint(fn, *args, context_fn=contexts, **kwargs)

        replaced["checkpoint"] = checkpoint
    swaps = [(F, "scaled_dot_product_attention", attention)]
    for name, module in list(sys.modules.items()):
        if name.startswith("ttt_video.") and not name.startswith("ttt_video.ops"):
            swaps += [(module, attr, new) for attr, new in replaced.items() if hasattr(module, attr)]
    saved = [(m, attr, getattr(m, attr)) for m, attr, _ in swaps]
    try:
        for m, attr, new in swaps:
            setattr(m, attr, new)
        yield
    finally:
        for m, attr, old in saved:
            setattr(m, attr, old)


def _cogvideox_config(model_cfg, **overrides):
    from ..models.cogvideox_ttt import CONFIG_FILE, load_config, transformer_folder, ttt_settings

    if not model_cfg.pretrained:
        raise UserError("model.pretrained must name a local diffusers CogVideoX folder (its config.json is enough)")
    folder = transformer_folder(model_cfg.pretrained)
    return load_config(folder / CONFIG_FILE, **ttt_settings(model_cfg), **overrides)


def build_untrained(cfg, depth=None, device="meta"):
    """The model of `cfg` with random weights (CogVideoX: from its config.json alone, no weights
    read) and the run's adapter applied; `depth` overrides the number of blocks."""
    with torch.device(device):
        if cfg.model.arch == "cogvideox-ttt":
            from ..models.cogvideox_ttt import FrameworkCogVideoXTTT

            model = FrameworkCogVideoXTTT(_cogvideox_config(cfg.model, **({"num_layers": depth} if depth else {})))
        else:
            model = build_model(dataclasses.replace(cfg.model, depth=depth or cfg.model.depth))
    tc = cfg.train
    model = apply_adapter(model, tc.adapter, tc.lora_rank, tc.lora_alpha)
    return cast_frozen(model, tc.frozen_dtype, tc.mixed_precision).to(device).train()


def step_inputs(cfg, model, batch_size, device="meta", dtype=torch.float32):
    """Random model inputs of one micro-batch, shaped as the trainer feeds them; returns a function
    of the model computing the loss."""
    d, B, S = cfg.data, batch_size, cfg.data.num_scenes

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    if cfg.model.arch == "cogvideox-ttt":
        mc = model.cfg
        n = (d.frames_per_scene - d.segment_overlap) // mc.temporal_compression_ratio + 1  # latent frames
        if n != mc.frames_per_segment and S > 1:
            raise UserError(f"data.frames_per_scene={d.frames_per_scene} gives {n} latent frames per "
                            f"segment, the model has {mc.frames_per_segment}; set model.segment_frames")
        x = rand(B, mc.in_channels, S * (n - 1) + 1, d.height // 8, d.width // 8)  # [B, C, F, h, w]
        text = rand(B, S, d.text_max_length, mc.text_embed_dim)
        t = torch.full((B,), 500.0, device=device)
        return lambda m: m(x, t, text).float().square().mean()
    if d.vae != "identity":
        raise UserError("plan knows the latent shape of data.vae=identity (pixels) and of arch cogvideox-ttt only")
    x = rand(B, cfg.model.in_channels, S * d.frames_per_scene, d.height, d.width)  # [B, C, F, h, w]
    text = rand(B, S, d.text_max_length, cfg.model.text_dim)
    mask = torch.ones(B, S, d.text_max_length, dtype=torch.bool, device=device)
    t = torch.full((B,), 500.0, device=device)
    return lambda m: m(x, t, text, mask).float().square().mean()


def _simulated_step(cfg, batch_size, depth, checkpointing):
    """Peak bytes of activations, gradients and autocast copies together over one simulated training
    step, and bytes offloaded to host memory. Like the trainer, the forward runs under autocast and
    backward outside it: autocast's cached copies of the trainable weights go when the forward ends,
    except those a graph node saved."""
    from .trainer import enable_checkpointing

    model = build_untrained(cfg, depth)
    enable_checkpointing(model, cfg.train, checkpointing)
    loss_of = step_inputs(cfg, model, batch_size)
    tracker = _LiveBytes()
    for t in [*model.parameters(), *model.buffers()]:
        tracker.ignore(t)
    dtype = HALF.get(cfg.train.mixed_precision)
    autocast = _Autocast(dtype) if dtype else None
    host = []
    with _stand_ins(autocast, host), tracker:
        with autocast or contextlib.nullcontext():
            loss = loss_of(model)
        if autocast is not None:
            autocast.cached.clear()
        loss.backward()
    return tracker.peak, sum(host)


def step_model(cfg, checkpointing, depth):
    """S(b, D) of the module docstring as a function, from simulated steps at D = 2 and 3 for each
    micro-batch b asked for; it gives the host memory of offloaded block inputs beside it,
    extrapolated alike."""
    d1, d2 = min(2, depth), min(3, depth)

    @functools.cache
    def simulated(b, d):
        return _simulated_step(cfg, b, d, checkpointing)

    def extrapolated(b, d):
        return tuple(max(0, simulated(b, d1)[i] + (d - d1) * (simulated(b, d2)[i] - simulated(b, d1)[i]))
                     for i in (0, 1))

    return extrapolated


def parameter_counts(cfg):
    """(bytes of all parameters, trainable parameters, blocks) of the model with the run's adapter."""
    model = build_untrained(cfg)
    params = list(model.parameters())
    depth = model.cfg.num_layers if cfg.model.arch == "cogvideox-ttt" else cfg.model.depth
    return (sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params if p.requires_grad),
            depth)


def estimate(cfg, batch_size, checkpointing, counts=None, step=None):
    """The `Estimate` of one micro-batch size; `counts` and `step` (from `parameter_counts` and
    `step_model`) are computed when not given."""
    weights, trainable, depth = counts or parameter_counts(cfg)
    step = step or step_model(cfg, checkpointing, depth)
    tc = cfg.train
    peak, host = step(batch_size, depth)
    return Estimate(batch_size, checkpointing, weights=weights, optimizer=8 * trainable,
                    ema=4 * trainable if tc.ema_decay else 0, step=peak, host=host,
                    parts=checkpointing and tc.checkpoint_parts, offload=checkpointing and tc.offload_checkpoints)


def micro_batches(global_batch):
    return [b for b in range(1, global_batch + 1) if global_batch % b == 0]


def plan(cfg, budget):
    """Estimates for every micro-batch dividing the global batch (train.batch_size x
    grad_accum_steps) under each of `recompute_settings`, and the proposal (`propose`).
    Returns (estimates, proposal or None)."""
    counts = parameter_counts(cfg)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum_steps
    rows = []
    for ckpt, parts, offload in recompute_settings(cfg):
        variant = with_recompute(cfg, parts, offload)
        step = step_model(variant, ckpt, counts[2])
        rows += [estimate(variant, b, ckpt, counts, step) for b in micro_batches(global_batch)]
    return rows, propose(rows, budget)


def propose(rows, budget):
    """The row that fits in `HEADROOM` of `budget` bytes with the least recompute (the fastest:
    none, then whole blocks, then offloaded inputs, then parts), and of those the largest
    micro-batch; None when nothing fits."""
    fitting = [r for r in rows if r.total <= HEADROOM * budget]
    return max(fitting, key=lambda r: (-RECOMPUTE.index(r.recompute), r.batch_size), default=None)


def gib(n):
    return f"{n / 2**30:.2f}"


def format_plan(cfg, rows, proposal, budget, measured=None):
    """The plan as a text table (GiB), with measured peaks beside the estimates when given."""
    tc = cfg.train
    global_batch = tc.batch_size * tc.grad_accum_steps
    host = any(r.host for r in rows)
    head = ["micro-batch", "accum", "checkpointing", "weights", "optimizer", "EMA", "step", "total",
            *(["host"] if host else []), "fits"]
    if measured is not None:
        head += ["measured", "error"]
    lines = [head]
    for r in rows:
        line = [str(r.batch_size), str(global_batch // r.batch_size), r.recompute_name,
                gib(r.weights), gib(r.optimizer), gib(r.ema), gib(r.step), gib(r.total),
                *([gib(r.host)] if host else []), "yes" if r.total <= HEADROOM * budget else "no"]
        if measured is not None:
            m = measured.get((r.batch_size, *r.recompute))
            line += ["-", "-"] if m is None else [gib(m), f"{(r.total - m) / m:+.0%}"]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"memory in GiB; fits: total <= {HEADROOM:.0%} of {gib(budget)} GiB; global batch {global_batch}; "
                f"adapter {tc.adapter}; mixed precision {tc.mixed_precision}")
    text.append("step: the peak of activations, gradients and autocast's weight copies together over one forward "
                "and backward")
    if host:
        text.append("host: pinned host memory a process needs for the blocks' offloaded inputs "
                    "(train.offload_checkpoints), beside the GPU total")
    if proposal is None:
        text.append("nothing fits: try train.adapter=lora or ttt-only, train.mixed_precision=bf16, "
                    "fewer scenes or a smaller resolution")
    else:
        names = ("grad_checkpointing", "checkpoint_parts", "offload_checkpoints")
        if recompute_settings(cfg) != RECOMPUTE:  # only checkpointing on or off to choose
            names = names[:1]
        sets = "".join(f"--set train.{n}={str(v).lower()} " for n, v in zip(names, proposal.recompute))
        text.append(f"proposal: --set train.batch_size={proposal.batch_size} "
                    f"--set train.grad_accum_steps={global_batch // proposal.batch_size} {sets}"
                    f"(estimated peak {gib(proposal.total)} GiB)")
    return "\n".join(text)


def measure(cfg, batch_size, checkpointing, device, steps=3):
    """Run `steps` real training steps (random weights and inputs, the run's adapter, AdamW, EMA,
    autocast) on a CUDA `device`; returns (peak allocated bytes, seconds per step)."""
    from .trainer import EMA, enable_checkpointing, param_groups

    device = torch.device(device)
    torch.manual_seed(0)
    model = build_untrained(cfg, device=device)
    enable_checkpointing(model, cfg.train, checkpointing)
    tc = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr, tc.ttt_lr), betas=(0.9, 0.95))
    ema = EMA(model, tc.ema_decay) if tc.ema_decay else None
    loss_of = step_inputs(cfg, model, batch_size, device=device)
    dtype = HALF.get(tc.mixed_precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = None
    for step in range(steps):
        if step == 1:  # the first step allocates the optimizer state and warms the kernels up
            torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of(model)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / (steps - 1) if steps > 1 else float("nan")
    return torch.cuda.max_memory_allocated(device), seconds
