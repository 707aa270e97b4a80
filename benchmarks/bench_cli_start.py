"""How fast the CLI answers, and where numba starts paying for its load: fresh processes only.

Part 1 -- start-up, wall time of fresh processes (median of ``--repeat``), against baselines
measured in the same run: ``python -c pass`` (the interpreter alone) and ``python -c "import
torch"`` (what every command paid before the lazy imports):

* ``condu-merge --help``            (target ≤ 0.5 s)
* ``condu-merge inspect SMALL``     (target ≤ 1.5 s; a 3-task store of ~0.2M parameters)

Part 2 -- the ``backend="auto"`` crossover on the CPU: one fresh process per (backend, model
size) runs one continual ``add_task`` (a second task into a one-task store held in memory) on
a model of ``P`` parameters in 16 equal tensors and reports the wall time *including* the
backend's import and kernel load (what a CLI call pays). The crossover is the smallest ``P``
where numba's total is below torch's.

    python benchmarks/bench_cli_start.py --repeat 5 --json benchmarks/out/cli_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wall(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _small_store(path: str) -> None:
    code = f"""
import torch
from condu_merge.store import Store
g = torch.Generator().manual_seed(0)
shapes = {{"embed.weight": (512, 64), "attn.weight": (192, 64), "mlp.weight": (256, 64), "head.weight": (10, 64)}}
with Store({path!r}) as st:
    for i in range(3):
        st.add_task(f"t{{i}}", {{k: torch.randn(s, generator=g) for k, s in shapes.items()}})
"""
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)


_STEP = """
import sys, time
t0 = time.perf_counter()
import torch
from condu_merge import ContinualMerger
P, backend = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
n = max(1, P // 16)
d = [{f"t{j}": torch.randn(n, generator=g) for j in range(16)} for _ in range(2)]
t1 = time.perf_counter()
m = ContinualMerger(backend=backend)
m.add_task("a", d[0]); m.add_task("b", d[1])
t2 = time.perf_counter()
print(t2 - t0 - (t1 - t0), t1 - t0)
"""


def _step(P: int, backend: str, repeat: int) -> float:
    """Median wall of one process's two merges (import of torch and data generation subtracted;
    the backend's import and first-call kernel load included)."""
    times = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", _STEP, str(P), backend], env=ENV, check=True, capture_output=True, text=True
        )
        times.append(float(out.stdout.split()[0]))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="50000,200000,1000000,4000000,16000000,64000000")
    ap.add_argument("--json")
    args = ap.parse_args()
    py = sys.executable
    res: dict = {"repeat": args.repeat, "start": {}, "crossover": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        _small_store(store)
        res["start"] = {
            "python -c pass": _wall([py, "-c", "pass"], args.repeat),
            "python -c 'import torch'": _wall([py, "-c", "import torch"], args.repeat),
            "condu-merge --help": _wall([py, "-m", "condu_merge", "--help"], args.repeat),
            "condu-merge inspect (3 tasks, 0.2M params; fields and sha256 verified, torch-free)": _wall(
                [py, "-m", "condu_merge", "inspect", store], args.repeat
            ),
            "condu-merge inspect --no-verify (torch-free view)": _wall(
                [py, "-m", "condu_merge", "inspect", store, "--no-verify"], args.repeat
            ),
        }
    print("## CLI start (median wall, fresh processes)\n\n| command | s | x `import torch` |\n|---|---:|---:|")
    t_torch = res["start"]["python -c 'import torch'"]
    for k, v in res["start"].items():
        print(f"| `{k}` | {v:.3f} | {v / t_torch:.2f} |")
    try:
        import numba  # noqa: F401

        backends = ["torch", "numba"]
    except ImportError:
        backends = ["torch"]
    print("\n## backend crossover: two add_task calls in a fresh process (backend load included)\n")
    print(
        "| params | "
        + " | ".join(f"{b} s" for b in backends)
        + " | numba / torch |\n|---:|"
        + "---:|" * (len(backends) + 1)
    )
    crossover = None
    for P in [int(x) for x in args.sizes.split(",")]:
        row = {b: _step(P, b, args.repeat) for b in backends}
        res["crossover"][P] = row
        ratio = row["numba"] / row["torch"] if "numba" in row else float("nan")
        if crossover is None and ratio < 1:
            crossover = P
        print(f"| {P:,} | " + " | ".join(f"{row[b]:.3f}" for b in backends) + f" | {ratio:.2f} |")
    res["crossover_params"] = crossover
    print(
        f"\nnumba is faster from {crossover:,} parameters per process" if crossover else "\nnumba was never faster here"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
