"""TTT-MLP and TTT-Linear ops with implementation dispatch.

`impl`: "reference" (naive, autograd, any dtype), "torch" (fast PyTorch), "triton" (GPU kernels),
or None to pick the fastest available for the inputs.
"""

from . import reference
from . import torch as torch_impl

IMPLS = ("reference", "torch", "triton")


def _triton_module():
    try:
        from . import triton as triton_impl
    except ImportError:
        return None
    return triton_impl


def _pick(impl, q, mlp, mini_batch_size):
    if impl is None:
        triton_impl = _triton_module() if q.is_cuda else None
        if triton_impl is not None and triton_impl.supports(q, mlp, mini_batch_size):
            return triton_impl
        return torch_impl
    if impl == "reference":
        return reference
    if impl == "torch":
        return torch_impl
    if impl == "triton":
        triton_impl = _triton_module()
        if triton_impl is None:
            raise RuntimeError("impl='triton' needs the 'kernels' extra (pip install 'ttt-video[kernels]')")
        return triton_impl
    raise ValueError(f"unknown TTT impl {impl!r}; choose one of {IMPLS}")


def ttt_mlp(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
            initial_state=None, return_state=False, impl=None):
    """TTT-MLP over `[B, H, T, D]` inputs; see README "TTT ops" for the exact semantics."""
    return _pick(impl, q, True, mini_batch_size).ttt_mlp(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias,
                                  mini_batch_size=mini_batch_size, causal=causal, eps=eps,
                                  initial_state=initial_state, return_state=return_state)


def ttt_linear(q, k, v, eta, w1, b1, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
               initial_state=None, return_state=False, impl=None):
    """TTT-Linear over `[B, H, T, D]` inputs; see README "TTT ops" for the exact semantics."""
    return _pick(impl, q, False, mini_batch_size).ttt_linear(q, k, v, eta, w1, b1, ln_weight, ln_bias,
                                     mini_batch_size=mini_batch_size, causal=causal, eps=eps,
                                     initial_state=initial_state, return_state=return_state)
