"""The Hopper TTT-MLP forward (`ttt_video/ops/ttt/hopper.py`, Gluon) on the CPU: Gluon has no interpreter,
so this checks that the kernel compiles for compute capability 9.0 with what its design rests on; its
results are tested on an H100 (`test_ttt_triton.py`, the CUDA tests)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton.experimental.gluon")

COMPILE = """
import sys
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
    open(f"{sys.argv[1]}/{save}.ptx", "w").write(ptx)
    print(save, kernel.metadata.shared, ptx.count("wgmma.mma_async"), ptx.count("cp.async.cg"),
          ptx.count("wgmma.wait_group"), ptx.count("fence.proxy.async"))
"""


_MMA_REGISTER_A = re.compile(r"wgmma\.mma_async\.\S+\s+\{[^}]*\},\s*\{([^}]*)\}")
_PACK = re.compile(r"mov\.b32\s+(%r\d+),\s*\{(%rs\d+),\s*(%rs\d+)\}")


def _unguarded_register_operands(ptx):
    """The asynchronous wgmma products of `ptx` whose left operand is in registers that may be reused while
    the product runs: the wait that retires the product neither lists them (Gluon's `deps`, which Triton
    writes as a "wait for regs" comment; a register packed from two listed halves counts) nor follows the
    product's commit with nothing in between. Returns (line, registers not listed)."""
    lines = [line.strip() for line in ptx.splitlines()]
    halves = {m.group(1): {m.group(2), m.group(3)} for m in map(_PACK.search, lines) if m}
    found = []
    for i, line in enumerate(lines):
        operand = _MMA_REGISTER_A.search(line)
        if not operand:
            continue
        commit = next(j for j in range(i, len(lines)) if lines[j].startswith("wgmma.commit_group"))
        wait = next(j for j in range(commit, len(lines)) if lines[j].startswith("wgmma.wait_group"))
        listed = set()
        if lines[wait - 1].startswith("// wait for regs:"):
            listed = {r.strip() for r in lines[wait - 1].split(":", 1)[1].split(",")}
        free = [r.strip() for r in operand.group(1).split(",")]
        free = [r for r in free if r not in listed and not halves.get(r, {r}) <= listed]
        between = [t for t in lines[commit + 1:wait] if t and not t.startswith(("//", ".loc"))]
        if free and between:
            found.append((i + 1, free))
    return found


def test_register_operand_check_flags_an_operand_left_unguarded():
    """The check below on hand-written PTX: a product whose register operand is neither listed by its wait
    nor waited for at once (what v32 did with -G2, NOTES.md) is flagged; listed (directly or as the two
    halves it was packed from) or waited for at once, it is not."""
    head = "mov.b32 %r7, {%rs1, %rs2};\nwgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r1,%r2}, {%r7,%r8,%r9,%r10}, %rd1, p, 1, 1, 1;\nwgmma.commit_group.sync.aligned;\n"
    work = "ld.global.v2.b32 {%r20, %r21}, [%rd5];\n"
    wait = "wgmma.wait_group.sync.aligned 0;\n"
    assert _unguarded_register_operands(head + work + "// wait for regs: %r1,%r2\n" + wait) == [
        (2, ["%r7", "%r8", "%r9", "%r10"])]
    assert _unguarded_register_operands(head + work + "// wait for regs: %r1,%r2,%rs1,%rs2,%r8,%r9,%r10\n" + wait) == []
    assert _unguarded_register_operands(head + ".loc 1 2 3\n// wait for regs: %r1,%r2\n" + wait) == []


def test_hopper_forward_compiles_for_sm90(tmp_path):
    """Both builds (with and without checkpoints) compile; their products are wgmma (4 instructions of K =
    16 for each of the step's 8 products a hidden chunk and for the bias updates' column sums, b1's a
    chunk and b2's, written once in the loops), waited for in 7 groups; the next mini-batch's q, k and v
    come in by `cp.async`; shared-memory writes are fenced for the products; the shared memory holds
    W1 and W2 in bf16 with the token and gradient tiles, within what an H100 SM gives one program; and no
    asynchronous product's register operand is left free to be reused while it runs."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for line, save in zip(run.stdout.split("\n"), ("False", "True")):
        flag, shared, wgmma, copies, waits, fences = line.split()
        assert flag == save
        assert 64 * 1024 < int(shared) <= 227 * 1024  # W1 and W2 of the chain in bf16: 64 KB
        assert int(wgmma) == 40 and int(waits) == 7
        assert int(copies) > 0 and int(fences) > 0
        assert _unguarded_register_operands((tmp_path / f"{save}.ptx").read_text()) == []
