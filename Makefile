# The two commands the README names: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Two pytest processes: most tests run one torch thread and wait on services, sandboxes and
# browsers, so one process leaves the second core idle (load 1.1 on two cores, 33 min; two: 20 min).
# A file stays on one process (--dist loadfile): module fixtures train their models once.
TEST_WORKERS ?= 2

.PHONY: setup test demo bench clean

setup:
	@scripts/bootstrap.sh

test: setup
	@scripts/services.sh start
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/refine-audit demo --out out/demo

bench: setup
	$(PY) -m bench.refine_fmnist

clean:
	rm -rf out .pytest_cache
