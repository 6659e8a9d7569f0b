"""Shapes of what the TTT backward kernels allocate besides the gradients they return, without
Triton: `triton.py` and `hopper.py` allocate these buffers and the training memory plan
(`train/plan.py`) counts them, so both read them here."""


def mlp_backward_padding(length):
    """Tokens the TTT-MLP backward appends to a sequence of `length`: it runs T rounded up to a multiple
    of 16 (Triton then compiles it knowing that, and that build spills far less: v16 in NOTES.md)."""
    return -length % 16


def mlp_backward_scratch(chains, programs, group, mini_batch_size, head_dim, hidden, low_precision, primal):
    """Shapes of the TTT-MLP backward's scratch for `programs` per chain (1 or 2) and checkpoint groups of
    `group` mini-batches, where `low_precision` says the products are bfloat16 and `primal` that the build
    takes the primal form (`_mlp_primal` in triton.py): the recomputed states (group a group, the states
    before its mini-batches, and with `primal` the one after them too; two groups in flight at two programs
    a chain; the leading dims, each inner weight's shape follows; W1 and
    W2 in bfloat16 where the products are, as they are only products' operands, b1 and b2 float32), what
    the queries' half leaves the keys' half (float32 slots; `_par_offsets` in triton.py: one mini-batch's
    worth per recomputed state at two programs, else one; its largest parts in bfloat16 where the
    products are; the primal form's has no gradient parts), and step scratch in float32 slots: the keys'
    half's (a `[mini-batch, hidden]` partial dZ1, bfloat16 where the products are, and the
    `[mini-batch, head dim]` target), then the float32 state the recompute steps (W1, b1, W2, b2)."""
    bs, D, F = mini_batch_size, head_dim, hidden
    slots = programs * group if programs > 1 else 1
    low = (0 if primal else 2 * bs * F) + 2 * D * F
    par = (low // 2 if low_precision else low) + F + D + (1 if primal else 3) * bs * D
    states = programs * (group + 1 if primal else group)
    return (chains, states), (chains, slots, par), (chains, bs * (F + D) + 2 * D * F + F + D)


HOPPER_WINDOW = 4  # checkpoint groups the Hopper backward recomputes side by side (`hopper.backward`)


def mlp_hopper_backward_scratch(chains, groups, group, head_dim, hidden, mini_batch_size):
    """Shapes of the Hopper TTT-MLP backward's scratch (`hopper.backward`) for `groups` checkpoint groups of
    `group` mini-batches. Two sets, one a window in flight, of: the window's recomputed states (W1 and W2 in
    bfloat16, b1 and b2 in float32) and what their queries' halves leave the keys' halves (float32 slots:
    W1's and W2's parts in bfloat16 as `[64, 64]` tiles a hidden chunk, then b1's, b2's and Z2). Then the float32 states that the recompute
    steps (one a chain and group of a window) and their LayerNorm gradient rows (float32, weight and
    bias)."""
    D, F, bs = head_dim, hidden, mini_batch_size
    window = min(HOPPER_WINDOW, groups)
    slots = (chains, window * group)
    return dict(low=(2, 2, *slots, D * F), b1=(2, *slots, F), b2=(2, *slots, D),
                par=(2, *slots, D * F + F + D + bs * D), run=(chains * window, 2 * D * F + F + D),
                ln=(2, chains * window, D))


LINEAR_WINDOW = 4  # checkpoint groups the TTT-Linear backward recomputes side by side (`_linear_backward`)


def linear_backward_scratch(chains, groups, group, mini_batch_size, head_dim):
    """Shapes of the TTT-Linear backward's scratch (`_linear_backward` in triton.py) for `groups` checkpoint
    groups of `group` mini-batches: of each of two sets (one a window in flight), the window's slots a chain
    (one a mini-batch) for the states before the mini-batches (W, b), dg's part and the adjoint's parts
    (W's, b's), all float32; then the queries' halves' LayerNorm gradient rows (weight and bias)."""
    D, bs = head_dim, mini_batch_size
    window = min(LINEAR_WINDOW, groups)
    slots = (chains, window * group)
    return (*slots, D, D), (*slots, D), (*slots, bs, D), (*slots, D, D), (*slots, D), (2, chains * window, D)
