"""backend="auto" | "torch" | "native" | "numba" | "triton": which backend runs, and same results from each."""

from __future__ import annotations

import pytest
import torch

import condu_merge as cm
from condu_merge import backends as B
from condu_merge.backends import get_backend, resolve_backend
from condu_merge.kernels import decouple_many, decouple_many_flat


def test_auto_on_cpu_picks_the_native_kernels_then_numba():
    assert B.AUTO_ORDER["cpu"][:2] == ["native", "numba"] and B.AUTO_ORDER["cuda"][0] == "triton"
    want = "native" if "native" in B.available_backends() else "numba"
    if want == "numba":
        pytest.importorskip("numba")
    assert resolve_backend("auto", torch.device("cpu")).name == want


def test_auto_without_the_native_kernels_picks_numba():
    pytest.importorskip("numba")
    saved = dict(B._INSTANCES)
    B._INSTANCES["native"] = None  # as on a machine where the extension was not built
    try:
        assert resolve_backend("auto", torch.device("cpu")).name == "numba"
    finally:
        B._INSTANCES.clear()
        B._INSTANCES.update(saved)


def test_explicit_names():
    cpu = torch.device("cpu")
    assert resolve_backend("torch", cpu).name == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("no-such-backend", cpu)


def test_auto_falls_back_to_torch_when_optional_dependency_missing():
    def broken():
        raise ImportError("simulated missing optional dependency")

    saved = list(B.AUTO_ORDER["cpu"])
    B.register_backend("_broken_fast", broken, auto_for={"cpu": 0})
    try:
        assert resolve_backend("auto", torch.device("cpu")).name in ("native", "numba", "torch")
        with pytest.raises(RuntimeError, match="not available"):
            get_backend("_broken_fast")
    finally:
        B.AUTO_ORDER["cpu"] = saved
        B._FACTORIES.pop("_broken_fast", None)
        B._INSTANCES.pop("_broken_fast", None)


def test_triton_on_cpu_needs_the_interpreter():
    pytest.importorskip("triton")
    from condu_merge.kernels.triton_backend import interpreting

    cpu = torch.device("cpu")
    if interpreting():
        assert resolve_backend("triton", cpu).name == "triton"
    else:
        with pytest.raises(ValueError, match="does not run on cpu"):
            resolve_backend("triton", cpu)
    # auto never picks the (slow) interpreter for CPU tensors
    assert resolve_backend("auto", cpu).name != "triton"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_cpu_backend_gives_the_same_session():
    gen = torch.Generator().manual_seed(2)
    shapes = {"w": (6, 11), "b": (6,), "h": (3, 3)}
    deltas = [
        {k: torch.randn(s, generator=gen).to(torch.float16 if k == "h" else torch.float32) for k, s in shapes.items()}
        for _ in range(4)
    ]
    names = [n for n in ("torch", "numba", "native", "auto") if n in ("torch", "auto") or n in cm.available_backends()]
    for mode in ("tensor_mean", "l1", "per_tensor"):
        _same_session_on_every_backend(deltas, shapes, names, mode)


def _same_session_on_every_backend(deltas, shapes, names, mode):
    results = {}
    for name in names:
        u, trig = cm.unify(deltas[:3], backend=name, rescaler=mode)
        u2, trig2 = cm.add_task(u, trig, deltas[3], backend=name, rescaler=mode)
        experts = [cm.decouple(u2, t, backend=name) for t in trig2]
        results[name] = (u2, trig2, experts)
    ref_u, ref_t, ref_e = results["torch"]
    for name, (u2, trig2, experts) in results.items():
        for k in shapes:
            assert torch.equal(u2[k], ref_u[k]), (name, mode, k)
            for a, b in zip(trig2, ref_t):
                assert torch.equal(a.packed[k], b.packed[k]), (name, mode, k)
                assert a.rescaler_for(k) == pytest.approx(b.rescaler_for(k), rel=1e-6)
            for a, b in zip(experts, ref_e):
                assert torch.equal(a[k], b[k]), (name, mode, k)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", ["torch", "native", "auto"])
def test_decouple_many_equals_decouple(backend):
    if backend not in ("torch", "auto") and backend not in cm.available_backends():
        pytest.skip(f"{backend} not available here")
    gen = torch.Generator().manual_seed(4)
    deltas = [
        {"w": torch.randn(9, 13, generator=gen), "v": torch.randn(20, generator=gen).bfloat16()} for _ in range(5)
    ]
    u, trig = cm.unify(deltas, rescaler="per_tensor")
    base = {
        "w": torch.randn(9, 13, generator=gen),
        "v": torch.randn(20, generator=gen).bfloat16(),
        "extra": torch.arange(3),
    }
    for b in (None, base):
        many = decouple_many(u, trig, base=b, backend=backend)
        for t, got in zip(trig, many):
            ref = cm.decouple(u, t, base=b, backend="torch")
            assert set(ref) == set(got)
            for k in ref:
                assert torch.equal(ref[k], got[k]), k
    with pytest.raises(cm.KeyMismatchError):
        decouple_many({"w": u["w"]}, trig)
    with pytest.raises(ValueError, match="K = len"):
        decouple_many_flat(u["w"].reshape(-1), torch.stack([trig[0].packed["w"]]), [1.0, 2.0])


@pytest.mark.parametrize("backend", ["torch", "numba", "native"])
def test_decouple_many_names_the_task_and_reads_grad_inputs(backend):
    """A shape mismatch names the trigger's task; a base that requires grad (live parameters)
    is read detached on every backend, as decouple does."""
    if backend not in cm.available_backends():
        pytest.skip(f"{backend} not available here")
    gen = torch.Generator().manual_seed(5)
    u, trig = cm.unify([{"w": torch.randn(4, 6, generator=gen)} for _ in range(2)], task_names=["cars", "dtd"])
    bad = cm.TaskTrigger(dict(trig[1].packed), {"w": (6, 4)}, 1.0, "dtd")
    with pytest.raises(cm.ShapeMismatchError, match="'dtd'.*'w'"):
        decouple_many(u, [trig[0], bad], backend=backend)
    base = torch.randn(4, 6, generator=gen)
    got = decouple_many(u, trig, base={"w": base.clone().requires_grad_(True)}, backend=backend)
    for t, g in zip(trig, got):
        assert torch.equal(g["w"], cm.decouple(u, t, base={"w": base}, backend="torch")["w"])


def test_backend_objects_are_checked_like_names():
    cpu = torch.device("cpu")
    inst = get_backend("torch")
    assert resolve_backend(inst, cpu) is inst

    class CudaOnly(type(inst)):
        name = "cuda-only"

        def supports(self, device):
            return device.type == "cuda"

    with pytest.raises(ValueError, match="'cuda-only' does not run on cpu"):
        resolve_backend(CudaOnly(), cpu)
    from condu_merge import unify

    with pytest.raises(ValueError, match="cuda-only"):
        unify([{"w": torch.ones(3)}], backend=CudaOnly())
    with pytest.raises(TypeError, match="neither a name nor a backend"):
        resolve_backend(object(), cpu)
