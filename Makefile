# The two quick-start commands. Each installs what it needs first (idempotent, fast when done).
PYTHON ?= python3

.PHONY: demo test bootstrap check fix docs gpu-wheels

bootstrap:
	PYTHON=$(PYTHON) bash scripts/bootstrap.sh

demo: bootstrap
	$(PYTHON) -m condu_merge demo

# the static checks (scripts/check.sh: ruff, mypy, the API reference build), then the suite; both
# always run, so one run reports every failure, and the status is non-zero if either failed
test: bootstrap
	@status=0; PYTHON=$(PYTHON) bash scripts/check.sh || status=1; $(PYTHON) -m pytest -q || status=1; exit $$status

# lint, format, types, API reference (scripts/check.sh); CI runs it before `make test`
check: bootstrap
	PYTHON=$(PYTHON) bash scripts/check.sh

# rewrite what ruff can fix (imports, pyupgrade, formatting) in place
fix: bootstrap
	PYTHON=$(PYTHON) bash scripts/check.sh --fix

# the API reference site in site/ (`$(PYTHON) -m mkdocs serve` to preview while editing)
docs: bootstrap
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

# the wheels a lent CUDA machine's image lacks (no registry there), for benchmarks/gpu_check.sh
gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu_wheels bitarray blake3
