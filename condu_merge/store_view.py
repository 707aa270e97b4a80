"""A read-only view of a store that never imports torch: what ``condu-merge inspect`` shows
(tasks, storage, mask density and overlaps), answered in a fraction of a second.

It reads ``manifest.json`` (format, version and checksum checked as :class:`~condu_merge.store.Store`
does; with ``verify=True`` also every field, and every data file's digest, in the algorithm its
record names), the data files' sizes, and the packed masks' bytes straight from the safetensors files
(popcounts by bitarray). Anything it does not expect raises :class:`ViewError`, and the caller
falls back to the full :class:`~condu_merge.store.Store` (which names the problem); the numbers
are the same as :meth:`Store.storage` / :meth:`Store.mask_stats` (a test compares them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Any

from .digests import DigestUnavailableError, check_record, require_algorithms
from .errors import FormatError
from .manifest_check import ST_ITEMSIZE as _ITEMSIZE, check_manifest_structure

_VERSIONS = (1, 2)
"""The ConDU manifest versions (``condu_merge.pipeline.STORE_VERSIONS``, whose module imports
numpy; a test keeps the two equal): 1 with sha256 records only, 2 once one is BLAKE3."""

__all__ = ["StoreView", "ViewError"]


class ViewError(Exception):
    """The light view cannot answer (the full Store will, or will name the problem)."""


def _packed(n: int) -> int:
    return (n + 7) // 8


class StoreView:
    """``manifest``, :meth:`storage` and :meth:`mask_stats` of the store at ``path``."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.root = os.path.abspath(os.fspath(path))
        mpath = os.path.join(self.root, "manifest.json")
        try:
            with open(mpath, encoding="utf-8") as fh:
                m = json.load(fh)
            body = {k: v for k, v in m.items() if k != "checksum"}
            digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            if (
                m.get("format") != "condu-merge/store"
                or type(m.get("version")) is not int
                or m["version"] not in _VERSIONS
                or m.get("checksum") != digest
            ):
                raise ViewError("not a store this view reads")
            try:  # a BLAKE3 store without the package: the full Store says what to install
                require_algorithms(m, mpath)
            except DigestUnavailableError as exc:
                raise ViewError(str(exc)) from None
            if verify:  # the store's own field checks (a FormatError names the field)
                check_manifest_structure(m, mpath)
            self.gen = os.path.join(self.root, m["generation_dir"])
            self.params = sum(math.prod(t["shape"]) for t in m["tensors"])
            for rel, info in m["files"].items():
                if os.path.getsize(os.path.join(self.gen, rel)) != info["bytes"]:
                    raise ViewError(f"{rel}: size differs")
            _ = [(t["name"], t["masks"], t["rescaler"], t["mask_bits"]) for t in m["tasks"]]
            self.manifest = m
            self._check_headers()
            if verify:
                self._check_hashes()
        except ViewError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ViewError(str(exc)) from None

    def _check_hashes(self) -> None:
        """Every data file's digest against the manifest, in the algorithm its record names (a
        mismatch, or BLAKE3 without the package: the full Store names it)."""
        for rel, info in self.manifest["files"].items():
            try:
                check_record(os.path.join(self.gen, rel), info)
            except (FormatError, DigestUnavailableError) as exc:
                raise ViewError(str(exc)) from None

    def _check_headers(self) -> None:
        """Every data file lists the manifest's tensors, in order, with the expected dtype and size."""
        m = self.manifest
        index = {t["masks"]: i for i, t in enumerate(m["tasks"])}
        for rel in ["unified.safetensors"] + [t["masks"] for t in m["tasks"]]:
            fh, _, header = self._mask_reader(rel)
            fh.close()
            meta = header.pop("__metadata__", None) or {}
            # a mask file's header names its task: swapped files are caught without hashing
            if rel in index and str(meta.get("task_index", index[rel])) != str(index[rel]):
                raise ViewError(f"{rel}: holds the masks of task #{meta.get('task_index')}")
            order = sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))
            if order != [t["name"] for t in m["tensors"]]:
                raise ViewError(f"{rel}: tensors differ from the manifest's")
            for t in m["tensors"]:
                e = header[t["name"]]
                want = (
                    (t["dtype"], t["shape"])
                    if rel == "unified.safetensors"
                    else ("U8", [_packed(math.prod(t["shape"]))])
                )
                if (e["dtype"], e["shape"]) != want:
                    raise ViewError(f"{rel}: tensor {t['name']!r} differs from the manifest")

    @property
    def specs(self) -> list[dict[str, Any]]:
        return self.manifest["tensors"]

    def storage(self) -> dict[str, object]:
        """:meth:`condu_merge.store.Store.storage`, from the manifest and file sizes."""
        m = self.manifest
        try:
            u_data = sum(math.prod(t["shape"]) * _ITEMSIZE[t["dtype"]] for t in m["tensors"])
        except KeyError as exc:
            raise ViewError(f"dtype {exc}") from None
        u_bytes = int(m["files"]["unified.safetensors"]["bytes"])
        mask_bytes = [int(m["files"][t["masks"]]["bytes"]) for t in m["tasks"]]
        mask_data = sum(_packed(math.prod(t["shape"])) for t in m["tensors"])
        proto_bytes = sum(int(m["files"][t["prototypes"]]["bytes"]) for t in m["tasks"] if t.get("prototypes"))
        manifest_bytes = os.path.getsize(os.path.join(self.root, "manifest.json"))
        base_bytes = int(m["base"]["bytes"]) if m.get("base") else None
        model_bytes = base_bytes if base_bytes is not None else u_data
        n = len(m["tasks"])
        store_bytes = u_bytes + sum(mask_bytes) + proto_bytes + manifest_bytes
        params = self.params
        return {
            "params": params,
            "tasks": n,
            "unified_bytes": u_bytes,
            "mask_bytes_per_task": mask_bytes,
            "mask_bits_per_param": (mask_data * 8 / params) if params else 0.0,
            "prototype_bytes": proto_bytes,
            "manifest_bytes": manifest_bytes,
            "store_bytes": store_bytes,
            "base_bytes": base_bytes,
            "condu_total_bytes": store_bytes + (base_bytes or 0),
            "individual_bytes": n * model_bytes,
        }

    def _mask_reader(self, rel: str):
        fh = open(os.path.join(self.gen, rel), "rb")
        try:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        except (struct.error, ValueError) as exc:
            fh.close()
            raise ViewError(f"{rel}: header ({exc})") from None
        return fh, 8 + n, header

    def mask_stats(self, *, progress: bool = False) -> dict[str, object]:
        """:meth:`condu_merge.store.Store.mask_stats`: density and pairwise overlaps ``|M_i ∧ M_j|``
        (``progress`` is accepted for the same signature; this is fast enough without a bar)."""
        from bitarray import bitarray
        from bitarray.util import count_and, count_or

        m = self.manifest
        names = [t["name"] for t in m["tasks"]]
        n = len(names)
        inter = [[0] * n for _ in range(n)]
        union = [[0] * n for _ in range(n)]
        readers = [self._mask_reader(t["masks"]) for t in m["tasks"]]
        try:
            for spec in m["tensors"]:
                want = _packed(math.prod(spec["shape"]))
                bas = []
                for fh, start, header in readers:
                    e = header.get(spec["name"])
                    if not e or e.get("dtype") != "U8" or e["data_offsets"][1] - e["data_offsets"][0] != want:
                        raise ViewError(f"mask of {spec['name']!r} is not what the manifest says")
                    fh.seek(start + e["data_offsets"][0])
                    raw = fh.read(want)
                    if len(raw) != want:
                        raise ViewError("truncated mask")
                    ba = bitarray(endian="little")
                    ba.frombytes(raw)
                    bas.append(ba)
                for i in range(n):
                    for j in range(i, n):
                        inter[i][j] += count_and(bas[i], bas[j]) if j != i else bas[i].count(1)
                        union[i][j] += count_or(bas[i], bas[j]) if j != i else bas[i].count(1)
        finally:
            for fh, _, _ in readers:
                fh.close()
        params = self.params
        for i in range(n):
            for j in range(i):
                inter[i][j], union[i][j] = inter[j][i], union[j][i]
        return {
            "density": {names[i]: (inter[i][i] / params if params else 0.0) for i in range(n)},
            "overlap_bits": inter,
            "jaccard": [[(inter[i][j] / union[i][j] if union[i][j] else 0.0) for j in range(n)] for i in range(n)],
        }
