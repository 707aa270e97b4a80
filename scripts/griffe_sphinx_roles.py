"""Griffe extension for the API reference (mkdocs.yml): Sphinx cross-reference roles in docstrings.

The docstrings use Sphinx roles, ``:func:`unify```, ``:class:`~condu_merge.store.Store```,
``:meth:`save```, which mkdocstrings would print verbatim. Each role becomes a link to the object
when it is rendered in the reference (an optional autorefs link: plain code otherwise). Targets
resolve as Sphinx does: relative to the documented object's class, then its module and package,
then as an absolute path; a leading ``~`` shows only the last name.

A ``condu_merge...`` target that names no existing object is a broken reference: it is logged as
a warning, so ``mkdocs build --strict`` fails. Targets outside condu_merge (``torch...``) stay
plain code.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

import griffe

log = logging.getLogger("mkdocs.plugins.condu_merge.roles")

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|attr|data|exc|obj|const)?:`([^`]+)`")


def _lookup(collection: Any, path: str) -> Any | None:
    try:
        return collection.get_member(path) if hasattr(collection, "get_member") else collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        pass
    # `package.name` exported through a lazy module __getattr__ (PEP 562): `name` is in the
    # package's static __all__ but bound only at run time; it is the one object of that name
    # defined in the package's submodules
    parent, _, name = path.rpartition(".")
    mod = _lookup(collection, parent) if parent else None
    if mod is None or mod.is_alias or not mod.is_module or name not in (mod.exports or ()):
        return None
    found = []
    stack = [m for m in mod.members.values() if not m.is_alias and m.is_module]
    while stack:
        sub = stack.pop()
        member = sub.members.get(name)
        if member is not None and not member.is_alias:
            found.append(member)
        stack.extend(m for m in sub.members.values() if not m.is_alias and m.is_module)
    return found[0] if len(found) == 1 else None


def _resolve(obj: griffe.Object, target: str, collection: Any) -> str | None:
    """The canonical path of ``target`` seen from ``obj``, or None."""
    scopes: list[str] = []
    o: Any = obj
    while o is not None:
        if o.is_class or o.is_module:
            scopes.append(o.path)
        o = o.parent
    for prefix in [*scopes, ""]:
        path = f"{prefix}.{target}" if prefix else target
        found = _lookup(collection, path)
        if found is not None:
            try:
                return str(found.final_target.path) if found.is_alias else str(found.path)
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return str(found.target_path) if found.is_alias else None
    return None


def _rewrite(obj: griffe.Object, text: str, collection: Any) -> str:
    def sub(m: re.Match[str]) -> str:
        raw = m.group(2).strip()
        short = raw.startswith("~")
        target = raw.lstrip("~").removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        path = _resolve(obj, target, collection)
        if path is None:
            if target.startswith("condu_merge"):
                log.warning("%s: docstring references %r, which does not exist", obj.path, raw)
            return f"`{shown}`"
        return f'<autoref identifier="{html.escape(path)}" optional><code>{html.escape(shown)}</code></autoref>'

    return _ROLE.sub(sub, text)


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring in a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection
        stack: list[Any] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias:
                continue
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = _rewrite(obj, obj.docstring.value, collection)
            stack.extend(obj.members.values())
