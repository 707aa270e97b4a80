"""The MTIL script's glue to :mod:`condu_merge.strategies`: method names, strategy options and the
storage column.

Methods of ``--methods``:

* ``zeroshot``, ``condu`` (the store-based path with routing), ``agnostic`` (ConDU, every sample
  routed), ``continual_ft`` -- the script's own paths;
* ``pam``, ``magmax``, ``task_arithmetic``, ``ties``, ``emr`` -- a
  :class:`~condu_merge.strategies.ContinualStrategy` each, over the trained tensors (full
  fine-tuning) or the flat LoRA factor dict (``--mode lora``), with θ_0 the pretrained values or
  the shared LoRA initialisation.

How each strategy's task parameters are obtained (no training that another method already did):

* ``task_arithmetic``, ``ties``, ``emr`` (:data:`DELTA_STRATEGIES`): non-continual references on
  the individually fine-tuned task vectors, i.e. the delta ConDU folds in, passed with
  ``end_task(delta=...)``. They keep every task vector: ``T ×`` one model each in host memory.
  On disk they share the session deltas (``OUT/strategies/deltas/<session:04d>.safetensors``,
  each written once) and are rebuilt from them on resume; they have no checkpoint of their own.
* ``magmax``: sequential fine-tuning + max-magnitude merging; its trajectory is continual FT's,
  so it folds continual FT's trained weights (``end_task(params=...)``).
* ``pam``: its own training per session from ``begin_task(task).params`` with ``start.hook``.

Storage (``results.json["storage"]``): ``{method: {shared_bytes, per_task_bytes, total, what}}``
with the strategies' own :meth:`~condu_merge.strategies.ContinualStrategy.stored_bytes`, and for
the script's paths: ConDU = unified delta ``u`` + per task its bit-packed masks (``⌈N/8⌉`` bytes
per tensor of ``N`` elements) + its rescaler (8 bytes per value), read from the store's tensor
specs (the same accounting as :class:`condu_merge.strategies.ConDU`; headers, prototypes and the
manifest are left out); continual FT = one delta; zero-shot = 0; individual FT = one delta per task.
"""

from __future__ import annotations

import csv
import inspect
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from condu_merge.packing import packed_nbytes
from condu_merge.strategies import EMR, PAM, TIES, MagMax, StorageReport, TaskArithmetic

SCRIPT_METHODS = ("zeroshot", "condu", "agnostic", "continual_ft")
STRATEGY_METHODS = ("pam", "magmax", "task_arithmetic", "ties", "emr")
VALID_METHODS = SCRIPT_METHODS + STRATEGY_METHODS
DELTA_STRATEGIES = ("task_arithmetic", "ties", "emr")  # folded from the individual FT delta
DEFAULT_METHODS = "zeroshot,condu,agnostic,continual_ft"
STRATEGY_CLASSES = {"pam": PAM, "magmax": MagMax, "task_arithmetic": TaskArithmetic, "ties": TIES, "emr": EMR}
LABELS = {
    "zeroshot": "Zero-shot",
    "continual_ft": "Continual FT",
    "individual_ft": "Individual FT",
    "pam": "PAM",
    "magmax": "MagMax",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "emr": "EMR",
}
MIB = float(1 << 20)


def parse_methods(text: str) -> list[str]:
    """``"zeroshot,condu,pam"`` -> the list, in that order, without repeats; an unknown name is a
    ``ValueError`` listing the valid ones."""
    out: list[str] = []
    for part in (text or "").split(","):
        m = part.strip()
        if m and m not in out:
            out.append(m)
    bad = [m for m in out if m not in VALID_METHODS]
    if bad:
        raise ValueError(f"unknown --methods {bad}; valid methods: {', '.join(VALID_METHODS)}")
    if not out:
        raise ValueError(f"--methods is empty; valid methods: {', '.join(VALID_METHODS)}")
    return out


def accepted_options(name: str, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``wanted`` that strategy ``name``'s constructor accepts (an option a
    version of the strategy does not have is left out rather than failing)."""
    params = inspect.signature(STRATEGY_CLASSES[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(wanted)
    return {k: v for k, v in wanted.items() if k in params}


def strategy_options(names: Sequence[str], args: Any, mode: str) -> dict[str, dict[str, Any]]:
    """Constructor options of each requested strategy from the command line (JSON-able)."""
    pam_align_on = args.pam_align_on or ("values" if mode == "lora" else "task_vector")
    wanted: dict[str, dict[str, Any]] = {
        "pam": {
            "align_fraction": args.pam_fraction,
            "align_every": 100 if args.pam_every is None else args.pam_every,
            "reset_to": args.pam_reset,
            "merge_coef": args.pam_merge_coef,
            "align_on": pam_align_on,
        },
        "magmax": {"scale": args.magmax_scale},
        "task_arithmetic": {"scale": args.ta_scale},
        "ties": {"density": args.ties_density},
        "emr": {"rescaler": args.rescaler},
    }
    return {n: accepted_options(n, wanted[n]) for n in names if n in STRATEGY_METHODS}


def runtime_options(name: str, args: Any) -> dict[str, Any]:
    """Options that change how, not what, a strategy computes (the merge backend: bit-exact
    across backends), so a resumed run may change them; passed to the constructor and as
    :func:`~condu_merge.strategies.load_strategy` overrides."""
    return accepted_options(name, {"backend": args.backend}) if name in ("emr",) else {}


# ---------------------------------------------------------------------------- storage


def storage_entry(shared: int, per_task: Mapping[str, int], what: str) -> dict[str, Any]:
    """One method's storage record (bytes beyond θ_0)."""
    per = {k: int(v) for k, v in per_task.items()}
    return {"shared_bytes": int(shared), "per_task_bytes": per, "total": int(shared) + sum(per.values()), "what": what}


def report_entry(rep: StorageReport) -> dict[str, Any]:
    """A strategy's :class:`StorageReport` as a storage record."""
    return storage_entry(rep.shared_bytes, rep.per_task_bytes, rep.what)


def condu_store_storage(store: Any) -> dict[str, Any]:
    """ConDU's storage from a store: ``u`` (Σ N·itemsize over its tensors) shared, and per task
    Σ ⌈N/8⌉ mask bytes + 8 bytes per rescaler value (one for ``tensor_mean``/``l1``, one per
    tensor for ``per_tensor``)."""
    specs = store.specs
    shared = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
    masks = sum(packed_nbytes(math.prod(s.shape)) for s in specs)
    per = {}
    for t in store.task_names:
        r = store.rescaler_of(t)
        per[t] = masks + 8 * (len(r) if isinstance(r, dict) else 1)
    return storage_entry(
        shared, per, "unified delta u (one model) + per task a 1-bit mask per element and its rescaler"
    )


def storage_rows(
    storage: Mapping[str, Mapping[str, Any]], one_model: int, labels: Mapping[str, str]
) -> list[list[Any]]:
    """``[label, what, total MiB, mean per-task MiB, total / one model]`` per method."""
    rows = []
    for m, e in storage.items():
        per = list(e["per_task_bytes"].values())
        rows.append(
            [
                labels.get(m, m),
                e["what"],
                e["total"] / MIB,
                (sum(per) / len(per) / MIB) if per else 0.0,
                e["total"] / one_model if one_model else float("nan"),
            ]
        )
    return rows


def _mib(x: float) -> str:
    """4 significant digits (LoRA factors of a tiny model are a few KiB, a ViT-B/16 hundreds of MiB)."""
    return "0" if x == 0 else f"{x:.4g}"


def storage_markdown(storage: Mapping[str, Mapping[str, Any]], one_model: int, labels: Mapping[str, str]) -> str:
    """The "Storage" table of results.md (bytes beyond θ_0; "× one model" = total / one delta)."""
    lines = ["| Method | What it stores | Total MiB | Per task MiB | × one model |", "|---|---|---|---|---|"]
    for label, what, total, per, ratio in storage_rows(storage, one_model, labels):
        lines.append(f"| {label} | {what} | {_mib(total)} | {_mib(per)} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def storage_csv(storage: Mapping[str, Mapping[str, Any]], one_model: int, labels: Mapping[str, str]) -> str:
    """storage.csv: one line per method, exact bytes."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["method", "what", "shared_bytes", "per_task_bytes_total", "total_bytes", "per_task_mib_mean", "x_one_model"]
    )
    for (m, e), row in zip(storage.items(), storage_rows(storage, one_model, labels)):
        w.writerow(
            [
                labels.get(m, m),
                e["what"],
                e["shared_bytes"],
                sum(e["per_task_bytes"].values()),
                e["total"],
                f"{row[3]:.6f}",
                f"{row[4]:.6f}",
            ]
        )
    return buf.getvalue()


def hook_stats_markdown(
    tasks: Sequence[str], hook_stats: Sequence[Mapping[str, Any] | None], method: str = "pam"
) -> str:
    """The "PAM's alignment hook" table of results.md: per session the optimizer steps the hook
    saw, the alignments it ran and the entries it re-initialised (summed over alignments), from
    ``results.json["hook_stats"]``; "-" where the session had no hook (the first: nothing to
    align to yet)."""
    lines = ["| Session | Task | Optimizer steps | Alignments | Reset entries |", "|---|---|---|---|---|"]
    for i, (task, rec) in enumerate(zip(tasks, hook_stats)):
        st = (rec or {}).get(method) or {}
        cells = [str(st[k]) if k in st else "-" for k in ("steps", "alignments", "resets")]
        lines.append(f"| {i + 1} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
