"""``condu-merge`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import ContinualMerger

    gen = torch.Generator().manual_seed(args.seed)
    shapes = {"encoder.weight": (256, 128), "encoder.bias": (256,), "head.weight": (10, 256)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    merger = ContinualMerger(rescaler=args.rescaler)
    deltas = {}
    t0 = time.perf_counter()
    for i in range(args.tasks):
        name = f"task{i + 1}"
        deltas[name] = {k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
        merger.add_task(name, deltas[name])
    elapsed = time.perf_counter() - t0
    print(f"merged {args.tasks} tasks of {sum(v.numel() for v in base.values())} parameters in {elapsed * 1e3:.1f} ms")
    for name in merger.task_names:
        rec = merger.decouple(name)
        a = torch.cat([v.flatten() for v in deltas[name].values()])
        b = torch.cat([rec[k].flatten() for k in deltas[name]])
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        rel = ((a - b).norm() / a.norm()).item()
        trig = merger.trigger(name)
        print(f"  {name}: lambda={trig.rescaler:.4f} mask density={trig.density():.3f} cos={cos:.4f} rel.L2 err={rel:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="condu-merge", description="Continual model merging (ConDU)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a continual session on a small seeded model family")
    d.add_argument("--tasks", type=int, default=5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--rescaler", default="tensor_mean")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
