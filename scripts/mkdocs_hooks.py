"""MkDocs hooks for the API reference site (mkdocs.yml ``hooks:``).

- Pages in ``docs/`` that ``nav`` does not list are appended to its "Guides" section, so a page
  added by a later change is published without editing mkdocs.yml (a listed page that is missing
  still fails the strict build).
- Links from a docs page to a repository file outside ``docs/`` (e.g. ``../condu_merge/store.py``)
  work on a code host but not in the built site: each is checked to exist (a broken one is a
  warning, so the strict build fails) and rendered as the file's repository path.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger("mkdocs.plugins.condu_merge")

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def _listed(nav: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(nav, str):
        out.add(nav)
    elif isinstance(nav, dict):
        for v in nav.values():
            out |= _listed(v)
    elif isinstance(nav, list):
        for v in nav:
            out |= _listed(v)
    return out


def on_config(config: Any) -> Any:
    nav = config.get("nav")
    if not nav:
        return config
    listed = _listed(nav)
    extra = sorted(
        f for f in os.listdir(config["docs_dir"]) if f.endswith(".md") and f not in listed and f != "README.md"
    )
    if not extra:
        return config
    for section in nav:
        if isinstance(section, dict) and "Guides" in section:
            section["Guides"].extend(extra)
            break
    else:
        nav.append({"More": extra})
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = os.path.abspath(config["docs_dir"])
    repo_root = os.path.dirname(docs_dir)
    page_dir = os.path.dirname(os.path.join(docs_dir, page.file.src_path))

    def fix(m: re.Match[str]) -> str:
        text, target = m.group(1), m.group(2)
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            return m.group(0)
        path = os.path.normpath(os.path.join(page_dir, target.split("#", 1)[0]))
        if path == docs_dir or path.startswith(docs_dir + os.sep):
            return m.group(0)  # inside docs/: mkdocs validates it
        rel = os.path.relpath(path, repo_root)
        if not os.path.exists(path):
            log.warning("%s: link to %r: no such file in the repository", page.file.src_path, target)
        return f"{text} (`{rel}` in the repository)"

    out, in_fence = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line.lstrip()):
            in_fence = not in_fence
        out.append(line if in_fence else _LINK.sub(fix, line))
    return "\n".join(out)
