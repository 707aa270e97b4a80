"""Merge throughput: unify, add_task and decouple on every available backend vs the baseline.

Times the library calls (``condu_merge.unify`` / ``add_task`` / ``decouple`` / ``decouple_many``
with ``backend=...``) and the straightforward baseline (:mod:`benchmarks.baseline`) in the same
run, on a synthetic state dict shaped like CLIP ViT-B/16 (302 tensors, 149.6M parameters) and
optionally a 1B-parameter 4-task case. Reports time, the minimal bytes moved (each input read
once, each output written once), GB/s, the fraction of a copy bandwidth measured in the same run,
the speed-up over the baseline and peak extra memory. Writes JSON and prints a markdown table.

    python benchmarks/bench_kernels.py --model vit-b16 --tasks 11 --scale 1.0 --json benchmarks/out/kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import condu_merge as cm
from benchmarks.baseline import baseline_add_task, baseline_unify
from benchmarks.memory import trim_heap
from condu_merge.kernels import decouple_many
from condu_merge.packing import unpack_mask


# ---------------------------------------------------------------------------- shapes
def _block(prefix: str, w: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.ln_1.weight": (w,),
        f"{prefix}.ln_1.bias": (w,),
        f"{prefix}.attn.in_proj_weight": (3 * w, w),
        f"{prefix}.attn.in_proj_bias": (3 * w,),
        f"{prefix}.attn.out_proj.weight": (w, w),
        f"{prefix}.attn.out_proj.bias": (w,),
        f"{prefix}.ln_2.weight": (w,),
        f"{prefix}.ln_2.bias": (w,),
        f"{prefix}.mlp.c_fc.weight": (4 * w, w),
        f"{prefix}.mlp.c_fc.bias": (4 * w,),
        f"{prefix}.mlp.c_proj.weight": (w, 4 * w),
        f"{prefix}.mlp.c_proj.bias": (w,),
    }


def vit_b16_shapes() -> dict[str, tuple[int, ...]]:
    """CLIP ViT-B/16 (open_clip layout): 302 tensors, 149,620,737 parameters."""
    s: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (197, 768),
        "visual.proj": (768, 512),
        "visual.conv1.weight": (768, 3, 16, 16),
        "visual.ln_pre.weight": (768,),
        "visual.ln_pre.bias": (768,),
    }
    for i in range(12):
        s.update(_block(f"visual.transformer.resblocks.{i}", 768))
    s.update({"visual.ln_post.weight": (768,), "visual.ln_post.bias": (768,)})
    s.update(
        {
            "positional_embedding": (77, 512),
            "text_projection": (512, 512),
            "logit_scale": (),
            "token_embedding.weight": (49408, 512),
        }
    )
    for i in range(12):
        s.update(_block(f"transformer.resblocks.{i}", 512))
    s.update({"ln_final.weight": (512,), "ln_final.bias": (512,)})
    return s


def llm_1b_shapes() -> dict[str, tuple[int, ...]]:
    """A 1B-parameter decoder (width 2048, 16 layers, vocab 32000): ~1.0e9 parameters."""
    w, f = 2048, 5632
    s: dict[str, tuple[int, ...]] = {"embed.weight": (32000, w), "lm_head.weight": (32000, w), "norm.weight": (w,)}
    for i in range(16):
        p = f"layers.{i}"
        s.update(
            {
                f"{p}.q": (w, w),
                f"{p}.k": (w, w),
                f"{p}.v": (w, w),
                f"{p}.o": (w, w),
                f"{p}.gate": (f, w),
                f"{p}.up": (f, w),
                f"{p}.down": (w, f),
                f"{p}.n1": (w,),
                f"{p}.n2": (w,),
            }
        )
    return s


def scaled(shapes: dict[str, tuple[int, ...]], scale: float) -> dict[str, tuple[int, ...]]:
    """Shrink the first dimension of every tensor by ``scale`` (keeps the tensor count)."""
    if scale >= 1.0:
        return shapes
    return {k: ((max(1, round(s[0] * scale)),) + tuple(s[1:])) if s else s for k, s in shapes.items()}


def numel(shapes) -> int:
    n = 0
    for s in shapes.values():
        p = 1
        for d in s:
            p *= d
        n += p
    return n


# ---------------------------------------------------------------------------- measurement
class PeakRSS:
    """Peak resident memory above the start, sampled every 2 ms (CPU); CUDA uses the allocator."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        trim_heap()
        self.start = self._rss()
        self.peak = self.start
        self.stop = False

        def run():
            while not self.stop:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.002)

        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop = True
            self.t.join()
            self.peak = max(self.peak, self._rss())
            self.extra = self.peak - self.start


def timed(fn, cuda: bool, repeats: int):
    best, extra, out = float("inf"), 0, None
    for _ in range(repeats):
        out = None
        gc.collect()
        with PeakRSS(cuda) as pk:
            t0 = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        best = min(best, dt)
        extra = max(extra, pk.extra)
    return best, extra, out


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """GB/s of ``dst.copy_(src)`` (read + write counted), best of 5."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def bytes_unify(N: int, n: int, es: int) -> int:
    return n * N * es + N * es + n * ((N + 7) // 8)


def bytes_add(N: int, t: int, es: int) -> int:
    return 2 * N * es + (t - 1) * ((N + 7) // 8) + N * es + t * ((N + 7) // 8)


def bytes_decouple(N: int, K: int, es: int) -> int:
    return N * es + K * ((N + 7) // 8) + K * N * es


# ---------------------------------------------------------------------------- the run
def run_case(label, shapes, n_tasks, dtype, device, backends, repeats, with_baseline, copy_gbs):
    gen = torch.Generator().manual_seed(0)
    N = numel(shapes)
    es = torch.empty((), dtype=dtype).element_size()
    cuda = device == "cuda"
    deltas = [
        {k: torch.randn(s, generator=gen).to(dtype).to(device) for k, s in shapes.items()} for _ in range(n_tasks)
    ]
    rows = []

    def row(op, impl, sec, nbytes, extra, base_sec=None):
        gbs = nbytes / sec / 1e9
        rows.append(
            {
                "case": label,
                "op": op,
                "backend": impl,
                "tasks": n_tasks,
                "params": N,
                "dtype": str(dtype),
                "seconds": sec,
                "bytes": nbytes,
                "GB_per_s": gbs,
                "copy_fraction": gbs / copy_gbs,
                "speedup_vs_baseline": (base_sec / sec) if base_sec else None,
                "peak_extra_MiB": extra / 2**20,
            }
        )
        print(f"  {op:13s} {impl:8s} {sec:8.3f} s {gbs:7.2f} GB/s  extra {extra / 2**20:8.1f} MiB", flush=True)

    # previous session (n-1 tasks) for add_task, made once with the fastest backend
    prev_u, prev_t = cm.unify(deltas[:-1], backend=backends[-1])
    base_u = base_a = None
    if with_baseline:
        base_u, extra, _ = timed(lambda: baseline_unify(deltas), cuda, 1)
        row("unify", "baseline", base_u, bytes_unify(N, n_tasks, es), extra)
        bool_masks = [{k: unpack_mask(t.packed[k], shape=prev_u[k].shape) for k in shapes} for t in prev_t]
        lams = [t.rescaler for t in prev_t]
        base_a, extra, _ = timed(lambda: baseline_add_task(prev_u, bool_masks, lams, deltas[-1]), cuda, 1)
        row("add_task", "baseline", base_a, bytes_add(N, n_tasks, es), extra)
        del bool_masks
    # every repeat runs every backend once, in turn, so a burst of load from elsewhere (or the first
    # touch of a fresh heap) hits all of them alike; the best of the repeats is kept
    u2, t2 = cm.add_task(prev_u, prev_t, deltas[-1], backend=backends[-1])  # bit-identical on every backend
    ops = {
        "unify": (lambda be: cm.unify(deltas, backend=be), bytes_unify(N, n_tasks, es), base_u),
        "add_task": (lambda be: cm.add_task(prev_u, prev_t, deltas[-1], backend=be), bytes_add(N, n_tasks, es), base_a),
        "decouple": (lambda be: cm.decouple(u2, t2[0], backend=be), bytes_decouple(N, 1, es), None),
        f"decouple_x{len(t2)}": (lambda be: decouple_many(u2, t2, backend=be), bytes_decouple(N, len(t2), es), None),
    }
    for be in backends:  # warm-up outside the timing: numba compiles (or loads its cache), Triton compiles
        for fn, _, _ in ops.values():
            fn(be)
    best: dict[tuple[str, str], float] = {}
    peak: dict[tuple[str, str], int] = {}
    for _ in range(repeats):
        for be in backends:
            for op, (fn, _, _) in ops.items():
                sec, extra, _ = timed(lambda fn=fn, be=be: fn(be), cuda, 1)
                best[op, be] = min(best.get((op, be), float("inf")), sec)
                peak[op, be] = max(peak.get((op, be), 0), extra)
    for be in backends:
        for op, (_, nbytes, base_sec) in ops.items():
            row(op, be, best[op, be], nbytes, peak[op, be], base_sec)
    return rows


def markdown(rows) -> str:
    out = [
        "| case | op | backend | tasks | params | s | GB/s | % copy BW | x baseline | peak extra MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = f"{r['speedup_vs_baseline']:.1f}" if r["speedup_vs_baseline"] else "-"
        out.append(
            f"| {r['case']} | {r['op']} | {r['backend']} | {r['tasks']} | {r['params'] / 1e6:.1f}M | {r['seconds']:.3f} | "
            f"{r['GB_per_s']:.2f} | {100 * r['copy_fraction']:.0f}% | {sp} | {r['peak_extra_MiB']:.0f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["vit-b16", "1b", "both"], default="vit-b16")
    ap.add_argument("--tasks", type=int, default=None, help="tasks (default 11 for vit-b16, 4 for 1b)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every tensor's first dim (for small machines)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="comma list (default: every available one)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", default="benchmarks/out/kernels.json")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    dev = torch.device(a.device)
    if a.backends:
        backends = a.backends.split(",")
    else:
        backends = [
            b
            for b in ("torch", "numba", "triton")
            if b in cm.available_backends()
            and cm.get_backend(b).supports(dev)
            and not (b == "triton" and dev.type == "cpu")
        ]
    copy_gbs = copy_bandwidth(a.device)
    print(
        f"device {a.device}, copy bandwidth {copy_gbs:.2f} GB/s, backends {backends}, torch threads {torch.get_num_threads()}"
    )
    cases = []
    if a.model in ("vit-b16", "both"):
        cases.append(
            ("vit-b16" + (f" x{a.scale:g}" if a.scale < 1 else ""), scaled(vit_b16_shapes(), a.scale), a.tasks or 11)
        )
    if a.model in ("1b", "both"):
        cases.append(("1b" + (f" x{a.scale:g}" if a.scale < 1 else ""), scaled(llm_1b_shapes(), a.scale), a.tasks or 4))
    rows = []
    for label, shapes, n in cases:
        print(f"{label}: {len(shapes)} tensors, {numel(shapes) / 1e6:.1f}M params, {n} tasks, {a.dtype}", flush=True)
        rows += run_case(label, shapes, n, dtype, a.device, backends, a.repeats, not a.no_baseline, copy_gbs)
        gc.collect()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": a.device,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
        "copy_GB_per_s": copy_gbs,
        "torch": torch.__version__,
        "command": " ".join(["python"] + sys.argv),
    }
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
