"""The fenced ```python blocks of README.md and docs/*.md run, so examples cannot drift from the code.

Each file is one session: its blocks run in order in one namespace (a later block may use what
an earlier one defined), in a fresh temporary working directory (files an example writes land
there).

A block that cannot run here (it needs a trained model, checkpoint files, a GPU cluster, or
stands for a loop body with ``...`` placeholders) is marked by an HTML comment, invisible when
rendered, on the line right before its fence::

    <!-- no-run: needs a CLIP model and images -->
    ```python
    ...
    ```

(``<!-- no-run -->`` without a reason works too). Such a block is not executed, but every
``from condu_merge... import ...`` / ``import condu_merge...`` line in it is, so a renamed or
removed public name still fails here.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_NO_RUN = re.compile(r"^\s*<!--\s*no-run\b.*-->\s*$")
_OPEN = re.compile(r"^(\s*)```\s*python\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    run: bool


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, dedented to their fence's indentation."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent = len(m.group(1))
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unterminated ```python block")
        body = "\n".join(ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1 : j])
        run = not (i > 0 and _NO_RUN.match(lines[i - 1]))
        blocks.append(Block(path, i + 1, body + "\n", run))
        i = j + 1
    return blocks


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]


def _import_lines(code: str) -> str:
    """The single-line ``condu_merge`` imports of a block, as runnable code."""
    out = []
    for line in code.split("\n"):
        try:
            tree = ast.parse(line.strip())
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "condu_merge":
                out.append(ast.unparse(node))
            elif isinstance(node, ast.Import) and all(a.name.split(".")[0] == "condu_merge" for a in node.names):
                out.append(ast.unparse(node))
    return "\n".join(out) + "\n"


FILES = [p for p in _doc_files() if p.exists() and python_blocks(p)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    for block in python_blocks(path):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        code = block.code if block.run else _import_lines(block.code)
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as exc:
            hint = "" if block.run else " (imports of a no-run block)"
            raise AssertionError(f"{where}: example block fails{hint}: {type(exc).__name__}: {exc}") from exc


def test_readme_api_tour_runs_for_real() -> None:
    """The README's API tour is a real, executed example, never marked no-run."""
    tour = [b for b in python_blocks(ROOT / "README.md") if "ContinualMerger" in b.code and "unify" in b.code]
    assert tour, "README.md has no API tour block"
    assert all(b.run for b in tour), "the README API tour must run (remove its <!-- no-run --> marker)"


def test_block_parser(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "text\n```python\na = 1\n```\n<!-- no-run: needs a model -->\n```python\nb = a +\n```\n"
        "- item\n\n   ```python\n   c = 2\n   ```\n```bash\necho no\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(md)
    assert [(b.line, b.code, b.run) for b in blocks] == [
        (2, "a = 1\n", True),
        (6, "b = a +\n", False),
        (11, "c = 2\n", True),
    ]
    assert _import_lines("from condu_merge import unify\nx = (\nimport os\nimport condu_merge.core\n") == (
        "from condu_merge import unify\nimport condu_merge.core\n"
    )
