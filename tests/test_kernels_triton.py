"""The Triton kernels against the torch reference.

Without a GPU they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here
before triton is imported; if another test already imported triton in compiled mode, the
interpreted cases re-run this file in a subprocess). Sizes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from condu_merge.kernels.conformance import DTYPES, check_backend  # noqa: E402
from condu_merge.kernels.triton_backend import TritonBackend, interpreting  # noqa: E402

INTERP = interpreting()
needs_interp = pytest.mark.skipif(
    not INTERP, reason="triton was imported in compiled mode; see test_interpreted_in_subprocess"
)
BE = TritonBackend(block=32)  # several programs and a ragged last block even for tiny tensors


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,N", [(1, 1), (3, 8), (12, 45)])
def test_triton_interpreted_matches_torch(dtype, n, N):
    check_backend(BE, dtype, n, N, seed=n * 100 + N)


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", ["ties", "tiny"])
def test_triton_interpreted_ties_underflow(dtype, style):
    check_backend(BE, dtype, 5, 37, seed=11, style=style)


@needs_interp
def test_triton_default_block():
    check_backend(TritonBackend(), torch.float32, 2, 131, seed=5)


@needs_interp
def test_triton_through_public_api():
    import condu_merge as cm

    gen = torch.Generator().manual_seed(1)
    deltas = [{"w": torch.randn(5, 7, generator=gen), "b": torch.randn(5, generator=gen).bfloat16()} for _ in range(4)]
    u_ref, t_ref = cm.unify(deltas[:3], backend="torch")
    u_tr, t_tr = cm.unify(deltas[:3], backend="triton")
    for k in u_ref:
        assert torch.equal(u_ref[k], u_tr[k])
        for a, b in zip(t_ref, t_tr):
            assert torch.equal(a.packed[k], b.packed[k])
    u2_ref, _ = cm.add_task(u_ref, t_ref, deltas[3], backend="torch")
    u2_tr, _ = cm.add_task(u_ref, t_ref, deltas[3], backend="triton")
    for k in u_ref:
        assert torch.equal(u2_ref[k], u2_tr[k])


def test_interpreted_in_subprocess():
    if INTERP or HAS_CUDA:
        pytest.skip("interpreted cases ran in this process (or a GPU runs the compiled ones)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "interpreted or default_block or public_api",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-2000:]  # the cases really ran


def test_kernels_lower_to_ptx_without_fma():
    """Compile every kernel for sm_90 (no GPU needed: triton ships ptxas) in a clean process:
    catches constructs the interpreter accepts but the compiler rejects, and checks that no
    multiply-add was contracted into an FMA (the numeric contract forbids it)."""
    code = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from condu_merge.kernels import triton_backend as tb
tgt = GPUTarget("cuda", 90, 32)
def comp(fn, sig, consts):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=tgt, options={"enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    assert "fma." not in ptx, fn.__name__
    assert ".ftz" not in ptx, fn.__name__  # subnormals kept, as torch keeps them
for DT, tn in [(tl.float32, "fp32"), (tl.bfloat16, "bf16")]:
    c = {"DT": DT, "OP": tl.float32, "BLOCK": 1024}
    comp(tb._unify_kernel, {"ptrs": "*i64", "n": "i32", "u_ptr": "*" + tn, "masks_ptr": "*u8", "num_part": "*fp64",
         "den_part": "*fp64", "N": "i32", "B": "i32", "DT": "constexpr", "OP": "constexpr", "BLOCK": "constexpr"}, c)
    comp(tb._add_task_kernel, {"u_ptr": "*" + tn, "masks_ptr": "*u8", "lam_ptr": "*fp64", "tp": "i32", "d_ptr": "*" + tn,
         "unew_ptr": "*" + tn, "mnew_ptr": "*u8", "absu_part": "*fp64", "num_new_part": "*fp64", "den_part": "*fp64",
         "N": "i32", "B": "i32", "DT": "constexpr", "OP": "constexpr", "BLOCK": "constexpr"}, c)
    comp(tb._decouple_kernel, {"u_ptr": "*" + tn, "packed_ptr": "*u8", "lam_ptr": "*fp64", "K": "i32", "base_ptr": "*" + tn,
         "out_ptr": "*" + tn, "N": "i32", "B": "i32", "DT": "constexpr", "OP": "constexpr", "BDT": "constexpr",
         "SOP": "constexpr", "HAS_BASE": "constexpr", "BLOCK": "constexpr"},
         {"DT": DT, "OP": tl.float32, "BDT": DT, "SOP": tl.float32, "HAS_BASE": True, "BLOCK": 1024})
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()):
        pytest.skip("triton's bundled ptxas is not available here")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,N", [(1, 1), (3, 1000), (11, 100_003)])
def test_triton_cuda_matches_torch(dtype, n, N):
    if INTERP:
        pytest.skip("TRITON_INTERPRET is set: the compiled kernels are not in use")
    check_backend(TritonBackend(), dtype, n, N, seed=n + N, device="cuda")
