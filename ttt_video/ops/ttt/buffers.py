"""Shapes of what the TTT-MLP backward kernel allocates besides the gradients it returns, without
Triton: `triton.py` allocates these buffers and the training memory plan (`train/plan.py`) counts
them, so both read them here."""


def mlp_backward_padding(length):
    """Tokens the TTT-MLP backward appends to a sequence of `length`: it runs T rounded up to a multiple
    of 16 (Triton then compiles it knowing that, and that build spills far less: v16 in NOTES.md)."""
    return -length % 16


def mlp_backward_scratch(chains, programs, group, mini_batch_size, head_dim, hidden):
    """Float32 shapes of the TTT-MLP backward's scratch for `programs` per chain (1 or 2) and checkpoint
    groups of `group` mini-batches: the recomputed states (two groups in flight at two programs a chain;
    the leading dims, each inner weight's shape follows), what the queries' half leaves the keys' half
    (`_par_offsets` in triton.py: one mini-batch's worth per recomputed state at two programs, else one),
    and the keys' half's step scratch (a `[mini-batch, hidden]` partial dZ1 and the `[mini-batch, head
    dim]` target)."""
    bs, D, F = mini_batch_size, head_dim, hidden
    slots = programs * group if programs > 1 else 1
    par = 2 * bs * F + 2 * D * F + F + D + 3 * bs * D
    return (chains, programs * group), (chains, slots, par), (chains, bs * (F + D))
