# The two quick-start commands. Each installs what it needs first (idempotent, fast when done).
PYTHON ?= python3

.PHONY: demo test bootstrap

bootstrap:
	PYTHON=$(PYTHON) bash scripts/bootstrap.sh

demo: bootstrap
	$(PYTHON) -m condu_merge demo

test: bootstrap
	$(PYTHON) -m pytest -q
