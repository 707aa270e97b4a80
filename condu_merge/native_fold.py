"""ConDU's continual step on numpy arrays and the native kernels: ``add-task`` without torch.

``import torch`` costs 1.5-2 s and about 600 MiB of resident memory on a 2-core machine, more than
the whole fold of a 512 MiB checkpoint (``benchmarks/RESULTS.md``, end to end). When a task comes
from safetensors files (the base and the fine-tuned checkpoint, single files or indexes of
safetensors shards), every tensor taking part is float32, float16 or bfloat16 in both
checkpoints and in the store, and the native kernels are built, :meth:`~condu_merge.store.Store.add_task_from_checkpoints` folds the task
here: the bytes are read into numpy buffers (:meth:`~condu_merge.checkpoints.SafetensorsFile.get_bytes`,
hashed as before), the delta is the native ``cm_sub`` and the step the native ``cm_unify`` /
``cm_add_task`` on those buffers, and the results go to the same writers. Nothing else changes:
the plan, the checks, the hashes, the manifest and the commit are the store's own, and the bytes
written are those of the torch fold (``tests/test_native_fold.py`` compares both bit for bit,
tensors folded in pieces included). Every other job (another backend, PEFT adapters, ``.bin``
files, a cast to the store's dtype, float64) takes the torch path.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from .checkpoints import HALF_EXPONENT, SafetensorsFile, ShardedCheckpoint, TaskDelta, element_ranges
from .errors import NonFiniteError
from .manifest_check import UNIFIED, mask_file
from .safetensors_writer import ST_ITEMSIZE, ST_TORCH_NAMES, TensorSpec

NATIVE_FOLD_ENV = "CONDU_MERGE_NATIVE_FOLD"
"""``0`` turns the torch-free fold off (every task then takes the torch path; for comparisons)."""

POOL_BYTES = 1 << 28
"""At most this many bytes of free read and result buffers are kept for reuse (256 MiB)."""


def unsupported(backend: object, td: TaskDelta, specs: Sequence[TensorSpec], earlier: int) -> str | None:
    """Why this task cannot be folded here (``None``: it can). Decided from the headers alone,
    before anything is read or written."""
    if os.environ.get(NATIVE_FOLD_ENV, "1") == "0":
        return f"${NATIVE_FOLD_ENV}=0"
    if backend not in ("auto", "native"):
        return f"backend {backend!r}"
    from .kernels import native_backend as nb

    if nb._lib() is None:
        return "the native kernels are not built"
    if earlier > nb.MAX_EARLIER_TASKS:
        return f"more than {nb.MAX_EARLIER_TASKS} earlier tasks"
    files: list[SafetensorsFile | ShardedCheckpoint] = []
    for ck in (td.base, td.finetuned):
        if not (isinstance(ck, SafetensorsFile) or (isinstance(ck, ShardedCheckpoint) and ck.all_safetensors)):
            return f"{getattr(ck, 'path', ck)} is not a safetensors file or an index of safetensors shards"
        files.append(ck)
    base, finetuned = files
    for s in specs:
        if s.st not in nb.ST_KIND:
            return f"tensor {s.name!r} is {ST_TORCH_NAMES[s.st]}"
        if base.spec(s.name).st != s.st or finetuned.spec(s.name).st != s.st:
            return f"tensor {s.name!r} is cast to the store's dtype"
    return None


class BufferPool:
    """Byte buffers the fold reuses for its reads and results, so that each tensor's bytes land
    in memory the process already touched (a fresh buffer is page-faulted and zeroed by the
    kernel: on the 2-core VM of ``benchmarks/RESULTS.md`` the kernel's page clearing was 11% of
    an ``add-task``'s CPU time, and first touches of memory the host took back are slower still).

    :meth:`take` hands out a view of a free buffer. A buffer is free again once nothing refers to
    it: the view the fold holds, and the memoryviews the background hashers and writers hold
    until their job ran (``sys.getrefcount``), so no buffer is reused while a worker reads it.
    Past ``limit`` bytes in all, free buffers are dropped (smallest first); those in use are
    bounded by the workers' queues."""

    _IDLE_REFS = 3  # the pool's list, the loop variable, getrefcount's argument

    def __init__(self, limit: int):
        self.limit = limit
        self._bufs: list[np.ndarray] = []

    def _fitting(self, nbytes: int) -> np.ndarray | None:
        """The smallest free buffer of at least ``nbytes`` (a function of its own: a loop variable
        left in :meth:`take`'s frame would keep the last buffer busy through :meth:`_trim`)."""
        best = None
        for buf in self._bufs:
            if buf.nbytes >= nbytes and sys.getrefcount(buf) == self._IDLE_REFS:
                if best is None or buf.nbytes < best.nbytes:
                    best = buf
        return best

    def take(self, nbytes: int) -> np.ndarray:
        best = self._fitting(nbytes)
        if best is None:
            best = np.empty(max(nbytes, 1), np.uint8)
            self._bufs.append(best)
            self._trim()
        return best[:nbytes]

    def _trim(self) -> None:
        total = sum(b.nbytes for b in self._bufs)
        if total <= self.limit:
            return
        keep = []
        for buf in sorted(self._bufs, key=lambda b: b.nbytes):
            if total > self.limit and sys.getrefcount(buf) == self._IDLE_REFS + 1:  # + the sorted list
                total -= buf.nbytes
            else:
                keep.append(buf)
        self._bufs = keep


def _non_finite_index(d: np.ndarray, st: str) -> int | None:
    """The first flat index of a NaN or Inf among ``d``'s elements of dtype ``st``, or ``None``."""
    if st == "F32":
        bad = ~np.isfinite(d.view(np.float32))
    else:
        exp = HALF_EXPONENT[st]
        bad = (d.view(np.uint16) & exp) == exp
    hit = np.flatnonzero(bad)
    return int(hit[0]) if hit.size else None


class NativeFold:
    """The fold of one task (``fold(specs, task, writer)``, as
    :meth:`~condu_merge.store.Store._stream_add` calls it): per tensor, the delta from ``td``,
    the store's ``u`` and earlier masks from ``files`` (the old generation's open data files,
    ``None`` for the first task), the step on the native kernels, its rescaler sums and mask bit
    counts gathered by ``rule`` (:meth:`~condu_merge.strategies.condu.ConDURule.record`), and
    ``u`` and every mask row handed to ``writer``. Tensors of more than ``chunk`` elements are
    folded in pieces of ``chunk``, as the torch fold does."""

    def __init__(self, td: TaskDelta, files: Any, rule: Any, label: str, chunk: int, crash: Any):
        self.td = td
        # unsupported() took only safetensors files and indexes of them
        self.base = cast("SafetensorsFile | ShardedCheckpoint", td.base)
        self.finetuned = cast("SafetensorsFile | ShardedCheckpoint", td.finetuned)
        self.files = files
        self.rule = rule
        self.label = label
        self.chunk = chunk
        self.crash = crash
        self.pool = BufferPool(POOL_BYTES)

    def __call__(self, specs: Sequence[TensorSpec], task: Any, writer: Any, progress: bool = False) -> None:
        t = task.index
        lams = task.meta.get("rescalers", [])
        items: Any = specs
        if progress:  # tqdm takes 30 ms to import: only for a bar
            from tqdm.auto import tqdm

            items = tqdm(specs, desc=f"add {task.name}", leave=False)
        for s in items:
            n = math.prod(s.shape)
            lam = [v[s.name] if isinstance(v, dict) else v for v in lams]
            if n > self.chunk:
                for a0, a1 in element_ranges(n, self.chunk):
                    self._step(s, a0, a1, t, lam, task, writer.write_part)
            else:
                self._step(s, 0, n, t, lam, task, writer.write)
            self.crash("write:tensor")

    def _step(self, s: TensorSpec, a0: int, a1: int, t: int, lam: list[float], task: Any, write: Any) -> None:
        from .kernels import native_backend as nb

        key, st = s.name, s.st
        take = self.pool.take
        nbytes = (a1 - a0) * ST_ITEMSIZE[st]
        f = self.finetuned.get_bytes(key, a0, a1, out=take(nbytes))  # not hashed: the delta goes into it
        b = self.base.get_bytes(key, a0, a1, out=take(nbytes))  # may be hashed in the background: only read
        nbad, big = nb.subtract_arrays(f, b, f, st)
        del b
        if nbad:
            raise self.td._overflow_error(key, big, ST_TORCH_NAMES[st])
        if t == 0:
            u, masks, num, den = nb.unify_one_array(f, st, take)
        else:
            u_old = self.files[UNIFIED].get_bytes(key, a0, a1, out=take(nbytes))
            m0, m1 = a0 // 8, (a1 + 7) // 8
            old = take(t * (m1 - m0)).reshape(t, m1 - m0)
            for i in range(t):
                self.files[mask_file(i)].get_bytes(key, m0, m1, out=old[i])
            u, masks, num, den = nb.add_task_arrays(u_old, old, lam, f, st, take)
            del u_old, old
        if not math.isfinite(float(num[t])):
            idx = _non_finite_index(f, st)
            if idx is not None:
                raise NonFiniteError.at(self.label, key, a0 + idx)
            raise NonFiniteError.norm_overflow(self.label, key)
        del f
        self.rule.record(task, key, a1 - a0, num.tolist(), den.tolist(), masks)
        write(UNIFIED, key, u)
        for i in range(t + 1):
            write(mask_file(i), key, masks[i])
