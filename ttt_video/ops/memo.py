"""An op call's forward results, kept from one run of a checkpointed function for its recompute.

With checkpoints nested as in CogVideoX's part-wise recompute (a checkpointed block whose parts, each
segment's attention and each TTT pass, are checkpointed again), backward first recomputes the block,
which runs each part afresh to get the block's later parts' inputs, and then recomputes each part on
its own for the part's backward: the same inputs, so the same results, a moment apart (PyTorch's nested
checkpoints recompute the frames of the step's first forward; the part runs of the block's recompute are
new frames, whose results only feed what comes after them). `OpMemo`, one per call site (a layer's
pass, a segment's attention), carries an op's results from a run in backward to the next recompute,
whose op returns them instead of running its kernels. A run outside backward keeps nothing: its results
would be held until the step's backward, for every block; and nothing kept outlives the backward that
kept it.

Taking part: the TTT Triton op (`ttt/triton.py`'s `_TTT`: output, final inner state, inner-state
checkpoints), attention through `ops.attention.attend` (output and log-sum-exp of a fused kernel), and
the memory plan's stand-ins for both (`train/plan.py`); the PyTorch TTT ops, whose backward is autograd
through their own forward, run as before."""

import contextlib
import threading

import torch

_local = threading.local()


def _in_backward():
    """Whether the autograd engine is running a backward pass on this thread (a checkpoint's recompute)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class OpMemo:
    """The kept results of one call site's TTT op. `checkpoint(..., context_fn=memo.contexts)`: a run of the
    checkpointed function keeps its op's results where it runs in backward; a recompute takes them."""

    def __init__(self):
        self.results = None

    def drop(self):
        self.results = None

    def contexts(self):
        return self._active("keep" if _in_backward() else None), self._active("take")

    @contextlib.contextmanager
    def _active(self, mode):
        outer, _local.active = getattr(_local, "active", None), (self, mode)
        try:
            yield
        finally:
            _local.active = outer
            if mode == "take":
                self.drop()  # kept for this recompute: taken, or not needed


def kept_or(make):
    """For the op: the results kept for this recompute, else `make()`'s, kept where the active run keeps."""
    results = take()
    if results is None:
        results = make()
        keep(results)
    return results


def take():
    """For the op: the results kept for this recompute (then dropped from the memo), or None."""
    memo, mode = getattr(_local, "active", None) or (None, None)
    if mode != "take" or memo.results is None:
        return None
    results, memo.results = memo.results, None
    return results


def keep(results):
    """For the op: keep `results` (tensors, or tuples of them) where the active run keeps; detached, as the
    recompute's op returns them as its own outputs."""
    memo, mode = getattr(_local, "active", None) or (None, None)
    if mode == "keep":
        memo.results = tuple(tuple(t.detach() for t in r) if isinstance(r, (tuple, list)) else r.detach()
                             for r in results)
        # never held past this backward (where nothing recomputes the pass: its inputs and weights frozen)
        torch.autograd.Variable._execution_engine.queue_callback(memo.drop)
