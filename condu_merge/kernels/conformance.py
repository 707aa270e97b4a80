"""Conformance checks: a backend must match TorchBackend bit for bit (masks, u) and to 1e-6 (sums).

Used by the test suite and usable for any third-party backend: ``check_backend(MyBackend(), torch.float32, 5, 1000, seed=0)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from condu_merge.backends.torch_backend import TorchBackend

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
REF = TorchBackend(chunk=48)  # small chunks: the reference itself crosses chunk edges


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    ok = torch.equal(bits(a.cpu()), bits(b.cpu()))
    if not ok:
        idx = (bits(a.cpu()) != bits(b.cpu())).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{what}: not bit-exact at {idx}: {a.cpu()[idx].tolist()} vs {b.cpu()[idx].tolist()}")


def assert_same_result(ref, got, what: str) -> None:
    assert_same_tensor(ref.u, got.u, f"{what} u")
    assert torch.equal(ref.masks.cpu(), got.masks.cpu()), f"{what}: masks differ"
    torch.testing.assert_close(got.num.cpu(), ref.num.cpu(), rtol=1e-6, atol=0, msg=f"{what} num")
    torch.testing.assert_close(got.den.cpu(), ref.den.cpu(), rtol=1e-6, atol=0, msg=f"{what} den")


def make_deltas(n: int, N: int, dtype: torch.dtype, gen: torch.Generator, style: str = "mixed") -> list[torch.Tensor]:
    """``n`` deltas of length ``N``. ``ties``: small integers (many exact ties and zero sums);
    ``mixed``: gaussians with ~25% exact zeros; ``tiny``: magnitudes near the dtype's underflow."""
    out = []
    for _ in range(n):
        if style == "ties":
            d = torch.randint(-2, 3, (N,), generator=gen).to(torch.float64) * 0.5
        else:
            d = torch.randn(N, generator=gen, dtype=torch.float64)
            d = d * (torch.rand(N, generator=gen, dtype=torch.float64) > 0.25)
            if style == "tiny":
                d = d * torch.finfo(dtype).tiny * 4
        out.append(d.to(dtype))
    return out


def make_lambdas(n: int, gen: torch.Generator) -> list[float]:
    lams = (torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 + 0.05).tolist()
    if n >= 3:
        lams[1] = 0.0  # a vanished expert
        lams[2] = 1.0 / 3.0  # not representable in fp32: opmath rounding matters
    return lams


def check_backend(be, dtype: torch.dtype, n: int, N: int, seed: int, style: str = "mixed", device: str = "cpu") -> None:
    """unify, add_task (from the unified result, with fresh λ's) and decouple (alone, with a base
    of the same and of another dtype, and batched) against the reference."""
    gen = torch.Generator().manual_seed(seed)
    ds = [d.to(device) for d in make_deltas(n, N, dtype, gen, style)]
    ref = REF.unify_flat(ds)
    got = be.unify_flat(ds)
    tag = f"{be.name} {dtype} n={n} N={N} {style}"
    assert_same_result(ref, got, f"unify {tag}")
    lams = make_lambdas(n, gen)
    new = make_deltas(1, N, dtype, gen, style)[0].to(device)
    assert_same_result(
        REF.add_task_flat(ref.u, ref.masks, lams, new), be.add_task_flat(ref.u, ref.masks, lams, new), f"add_task {tag}"
    )
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    for base in (
        None,
        torch.randn(N, generator=gen).to(dtype).to(device),
        torch.randn(N, generator=gen).to(other).to(device),
    ):
        for r in range(min(n, 3)):
            assert_same_tensor(
                REF.decouple_flat(ref.u, ref.masks[r], lams[r], base),
                be.decouple_flat(ref.u, ref.masks[r], lams[r], base),
                f"decouple {tag} base={None if base is None else base.dtype} row {r}",
            )
        many = be.decouple_many_flat(ref.u, ref.masks, lams, base)
        for r in range(n):
            assert_same_tensor(
                REF.decouple_flat(ref.u, ref.masks[r], lams[r], base), many[r], f"decouple_many {tag} row {r}"
            )
