"""The Hopper TTT-MLP kernels (`ttt_video/ops/ttt/hopper.py`, Gluon) on the CPU: Gluon has no interpreter,
so this checks that the kernels compile for compute capability 9.0 with what their design rests on; their
results are tested on an H100 (`test_ttt_triton.py`, the CUDA tests)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton.experimental.gluon")

COMPILE = """
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type
from ttt_video.ops.ttt import hopper

# the TMA stores' descriptors: [64, 64] bf16 tiles in the kernels' shared layout
TILES = mangle_type(TensorDescriptor.from_tensor(torch.zeros(64, 64, dtype=torch.bfloat16), [64, 64],
                                                 hopper.TILE.value))


def build(name, fn, pointers, low, scalars, constants, descs=()):
    signature = {p: TILES if p in descs else "*bf16" if p in low else "*fp32" for p in pointers}
    signature.update({s: "fp32" if s == "eps" else "i32" for s in scalars})
    signature.update({c: "constexpr" for c in constants}, num_warps="constexpr")
    # the pointers and T divisible by 16, as launched
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(pointers + [""]) if p not in descs}
    source = GluonASTSource(fn, signature, {**constants, "num_warps": hopper.WARPS}, aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": hopper.WARPS})
    ptx = kernel.asm["ptx"]
    open(f"{sys.argv[1]}/{name}.ptx", "w").write(ptx)
    print(name, kernel.metadata.shared, ptx.count("wgmma.mma_async"), ptx.count("cp.async.cg"),
          ptx.count("wgmma.wait_group"), ptx.count("fence.proxy.async"), ptx.count("cp.async.bulk.tensor"))


tokens = ["q_ptr", "k_ptr", "v_ptr", "eta_ptr"]
ckpt = ["cw1_ptr", "cb1_ptr", "cw2_ptr", "cb2_ptr"]
for save, split in ((False, 1), (True, 1), (True, 2)):
    build(f"forward-{save}-{split}", hopper._mlp_fwd_hopper, tokens + ["o_ptr", "lnw_ptr", "lnb_ptr", "w1_ptr",
          "b1_ptr", "w2_ptr", "b2_ptr"] + ckpt + ["xch_ptr", "xb2_ptr"], tokens + ["o_ptr", "xch_ptr"],
          ["T", "H", "NG", "eps"], {"F": 256, "G": 16, "SAVE": save, "S": split})
states = ["sw1_ptr", "sb1_ptr", "sw2_ptr", "sb2_ptr", "par_ptr", "parl_ptr"]
low = ["sw1_ptr", "sw2_ptr", "parl_ptr"]
descs = ["sw1_desc", "sw2_desc", "parl_desc"]
pend = 64 * 256 + 256 + 64 + 64 * 64
build("queries", hopper._mlp_queries_hopper, tokens + ["do_ptr", "dq_ptr", "lnw_ptr", "lnb_ptr"] + ckpt + ["run_ptr"]
      + [name.replace("_ptr", "_desc") if name in low else name for name in states] + ["dlnw_ptr", "dlnb_ptr"],
      tokens + ["do_ptr", "dq_ptr"], ["T", "H", "NG", "g_lo", "WG", "eps"], {"F": 256, "G": 16, "PEND": pend}, descs)
build("keys", hopper._mlp_keys_hopper, tokens[1:] + ["lnw_ptr", "lnb_ptr"] + states[:3] + ["dw1_ptr", "db1_ptr",
      "dw2_ptr", "db2_ptr"] + states[4:] + ["dk_ptr", "dv_ptr", "deta_ptr", "dlnw_ptr", "dlnb_ptr"],
      tokens[1:] + ["dk_ptr", "dv_ptr"] + low, ["T", "H", "n_lo", "n_hi", "NSLOT", "eps"], {"F": 256, "PEND": pend})
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


def test_hopper_kernels_compile_for_sm90(tmp_path):
    """Every build compiles for compute capability 9.0: the forward with and without checkpoints, one program a
    chain and two (a cluster that splits the hidden units: half the W1 and W2 chunks), and the backward's two
    kernels (the queries' halves with the group recompute, the keys' halves). Their products
    are wgmma, counted as written in the loops (4 instructions of K = 16 a product): the forward's 8 a
    hidden chunk and the bias updates' column sums, b1's a chunk and b2's (40), waited for in 7 groups; the
    queries' kernel's forward step and the query path's reverse (60, in 10 groups: the step's update takes
    X2 and GELU'(Z1) from its first pass, and the reverse X_q2 and GELU'(Z_q1) from the step); the keys' kernel's 8
    products a chunk in its first pass, 6 in its second and b2's column sum (60, in 5 groups). The tokens
    come in by `cp.async` (and the keys' kernel's states and adjoint chunks), the queries' kernel's bf16
    tiles (states, the adjoint's parts) go out by TMA and no other kernel's do, shared-memory writes are
    fenced for the products, each shared memory holds W1 and W2 in bf16 beside the token and gradient
    tiles within what an H100 SM gives one program, and no asynchronous product's register operand is
    left free to be reused while it runs."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    expect = {"forward-False-1": (40, 7), "forward-True-1": (40, 7), "forward-True-2": (40, 7), "queries": (60, 10),
              "keys": (60, 5)}
    lines = [line.split() for line in run.stdout.splitlines()]
    assert [line[0] for line in lines] == list(expect)
    for name, shared, wgmma, copies, waits, fences, stores in lines:
        assert 64 * 1024 < int(shared) <= 227 * 1024, name  # W1 and W2 of the chain (or half of them) in bf16
        assert (int(wgmma), int(waits)) == expect[name]
        assert int(copies) > 0 and int(fences) > 0, name
        assert (int(stores) > 0) == (name == "queries"), name  # its bf16 tiles go out by TMA
        assert _unguarded_register_operands((tmp_path / f"{name}.ptx").read_text()) == [], name
