#!/usr/bin/env bash
# The static checks CI runs before the tests (`make check`; config in pyproject.toml, mkdocs.yml):
#   lint    ruff check .                  (pyflakes, pycodestyle, bugbear, pyupgrade, isort, ...)
#   format  ruff format --check .
#   types   mypy                          (condu_merge/; strict on the public API modules)
#   docs    mkdocs build --strict         (the API reference; a warning or broken reference fails)
# Usage: scripts/check.sh [lint|format|types|docs ...]   (default: all; every one runs, the exit
#        status is non-zero if any failed)
#        scripts/check.sh --fix              rewrite what ruff can fix (imports, pyupgrade, format),
#                                            then list the lint errors left to fix by hand
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fix" ]]; then
  # fix, format, then list what still needs a hand (the exit status says whether anything does)
  "$PY" -m ruff check --fix --quiet . >/dev/null
  "$PY" -m ruff format . || exit 1
  exec "$PY" -m ruff check .
fi

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(lint format types docs)
failed=()

run() {  # run NAME CMD...: print, time, remember a failure, go on
  local name=$1 t0=$SECONDS
  shift
  echo "== check $name: $*"
  if "$@"; then
    echo "   ok: $name ($((SECONDS - t0)) s)"
  else
    echo "   FAILED: $name ($((SECONDS - t0)) s)"
    failed+=("$name")
  fi
}

site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
for s in "${steps[@]}"; do
  case $s in
    lint) run lint "$PY" -m ruff check . ;;
    format) run format "$PY" -m ruff format --check . ;;
    types) run types "$PY" -m mypy ;;
    # NO_MKDOCS_2_WARNING: silence mkdocs-material's banner about MkDocs 2 (not a build warning)
    docs) run docs env NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --quiet --site-dir "$site" ;;
    *) echo "unknown check '$s' (lint, format, types, docs)" >&2; exit 2 ;;
  esac
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "checks FAILED: ${failed[*]}   (scripts/check.sh --fix rewrites what ruff can; see CONTRIBUTING in README.md)"
  exit 1
fi
echo "checks passed: ${steps[*]}"
