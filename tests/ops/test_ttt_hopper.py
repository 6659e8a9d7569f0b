"""The Hopper TTT-MLP forward (`ttt_video/ops/ttt/hopper.py`, Gluon) on the CPU: Gluon has no interpreter,
so this checks that the kernel compiles for compute capability 9.0 with what its design rests on; its
results are tested on an H100 (`test_ttt_triton.py`, the CUDA tests)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.experimental.gluon")

COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from ttt_video.ops.ttt import hopper

names = ["q_ptr", "k_ptr", "v_ptr", "eta_ptr", "o_ptr", "lnw_ptr", "lnb_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr",
         "cw1_ptr", "cb1_ptr", "cw2_ptr", "cb2_ptr"]
signature = {name: "*bf16" if i < 5 else "*fp32" for i, name in enumerate(names)}
signature.update(T="i32", H="i32", NG="i32", eps="fp32", F="constexpr", G="constexpr", SAVE="constexpr",
                 num_warps="constexpr")
aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(names) + 1)}  # the pointers and T, as launches see them
for save in (False, True):
    source = GluonASTSource(hopper._mlp_fwd_hopper, signature,
                            {"F": 256, "G": 16, "SAVE": save, "num_warps": hopper.WARPS}, aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": hopper.WARPS})
    ptx = kernel.asm["ptx"]
    print(save, kernel.metadata.shared, ptx.count("wgmma.mma_async"), ptx.count("cp.async.cg"),
          ptx.count("wgmma.wait_group"), ptx.count("fence.proxy.async"))
"""


def test_hopper_forward_compiles_for_sm90():
    """Both builds (with and without checkpoints) compile; their products are wgmma (4 instructions of K =
    16 for each of the step's 8 products a hidden chunk and for the bias updates' column sums, b1's a
    chunk and b2's, written once in the loops), waited for in 7 groups; the next mini-batch's q, k and v
    come in by `cp.async`; shared-memory writes are fenced for the products; and the shared memory holds
    W1 and W2 in bf16 with the token and gradient tiles, within what an H100 SM gives one program."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for line, save in zip(run.stdout.split("\n"), ("False", "True")):
        flag, shared, wgmma, copies, waits, fences = line.split()
        assert flag == save
        assert 64 * 1024 < int(shared) <= 227 * 1024  # W1 and W2 of the chain in bf16: 64 KB
        assert int(wgmma) == 40 and int(waits) == 7
        assert int(copies) > 0 and int(fences) > 0
