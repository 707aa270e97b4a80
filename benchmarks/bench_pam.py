"""Cost of PAM's alignment step (``PAMAlignment.align``) against what it competes with.

PAM re-initialises, every ``align_every`` optimizer steps, the trained weights whose sign conflicts
with the global module's top-p weights. One alignment reads the weights, the int8 sign masks and
(for conflicting entries) the global values, and writes the weights and the optimizer's first
moments. This script times it on the shapes of CLIP ViT-B/16's LoRA (rank 32 on every attention
and MLP projection) and full weights, and compares it, in the same run, with

* ``copy``: one ``torch.Tensor.copy_`` of the same tensors (the memory-bound floor), and
* ``adamw``: one ``torch.optim.AdamW`` step on the same tensors (what a training step costs the
  optimizer alone; a real step also runs the model forward and backward).

    python benchmarks/bench_pam.py                  # LoRA r=32 and full ViT-B/16 shapes, CPU
    python benchmarks/bench_pam.py --device cuda    # on a GPU

Prints a table; ``--json`` writes the numbers. Alignment runs once per ``align_every`` steps
(default 100), so its amortised share of a training step is the ratio to ``adamw`` / 100.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from condu_merge.strategies import PAMAlignment

# ViT-B/16 (both towers, open_clip names): 12 visual + 12 text blocks; width 768 / 512
_TOWERS = (("visual", 768, 12), ("text", 512, 12))


def vit_b16_shapes() -> dict[str, tuple[int, int]]:
    """The 2-D weights of ViT-B/16's attention and MLP projections ([out, in])."""
    out = {}
    for tower, w, n in _TOWERS:
        for i in range(n):
            p = f"{tower}.transformer.resblocks.{i}"
            out[f"{p}.attn.in_proj_weight"] = (3 * w, w)
            out[f"{p}.attn.out_proj.weight"] = (w, w)
            out[f"{p}.mlp.c_fc.weight"] = (4 * w, w)
            out[f"{p}.mlp.c_proj.weight"] = (w, 4 * w)
    return out


def lora_shapes(rank: int) -> dict[str, tuple[int, int]]:
    out = {}
    for name, (o, i) in vit_b16_shapes().items():
        m = name[: -len(".weight")] if name.endswith(".weight") else name
        out[f"{m}.lora_A.weight"] = (rank, i)
        out[f"{m}.lora_B.weight"] = (o, rank)
    return out


def _timeit(fn, repeat: int, sync, setup=None) -> float:
    """Best of ``repeat`` timings of ``fn()`` (``setup()`` runs untimed before each)."""
    if setup:
        setup()
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        if setup:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def run_case(name: str, shapes: dict[str, tuple[int, int]], device: str, repeat: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    glob = {k: torch.randn(s, generator=g).to(device) for k, s in shapes.items()}
    # a trained copy that drifted: about a quarter of the important entries flipped sign
    start = {k: v + 0.8 * torch.randn(v.shape, generator=g).to(device) * v.abs().mean() for k, v in glob.items()}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-4)
    for p in params.values():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # allocate AdamW's state
    hook = PAMAlignment(glob, fraction=0.5)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def restore():  # the same conflicts every repeat
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])

    n = sum(v.numel() for v in glob.values())
    t_align = _timeit(lambda: hook.align(params, opt), repeat, sync, setup=restore)
    dst = {k: torch.empty_like(v) for k, v in glob.items()}
    t_copy = _timeit(lambda: [dst[k].copy_(v) for k, v in glob.items()], repeat, sync)
    t_adam = _timeit(opt.step, repeat, sync)
    resets = hook.resets[-1]
    return {
        "case": name,
        "params": n,
        "tensors": len(glob),
        "resets": resets,
        "align_s": t_align,
        "copy_s": t_copy,
        "adamw_step_s": t_adam,
        "align_over_copy": t_align / t_copy,
        "align_over_adamw": t_align / t_adam,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="lora,full", help="lora, full or both")
    ap.add_argument("--json", help="write the rows to this file")
    a = ap.parse_args(argv)
    rows = []
    for case in a.cases.split(","):
        shapes = lora_shapes(a.rank) if case == "lora" else vit_b16_shapes()
        rows.append(
            run_case(f"{case}" + (f" r={a.rank}" if case == "lora" else ""), shapes, a.device, a.repeat, a.seed)
        )
    print("| case | params | resets | align (ms) | copy (ms) | AdamW step (ms) | align / copy | align / AdamW step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['params'] / 1e6:.1f}M | {r['resets']:,} | {1e3 * r['align_s']:.1f} | {1e3 * r['copy_s']:.1f} | "
            f"{1e3 * r['adamw_step_s']:.1f} | {r['align_over_copy']:.2f}x | {r['align_over_adamw']:.2f}x |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
