# The two commands the README names: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

setup:
	@scripts/bootstrap.sh

test: setup
	@scripts/services.sh start
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/refine-audit demo --out out/demo

bench: setup
	$(PY) -m bench.refine_fmnist

clean:
	rm -rf out .pytest_cache
