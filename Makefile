# kickq developer tasks. Everything runs from the local virtualenv .venv.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := test,hiredis,metrics
PYTEST_ARGS ?=

# Interpreters tox looks for (python3.10 ... python3.13). Their real bin dirs
# go first on PATH for `make tox`, ahead of pyenv's shims (which refuse to run
# a version that is not selected). Missing ones are simply left out.
PYENV_ROOT ?= /root/.pyenv
PYENV_VERSIONS := 3.10.13 3.11.7 3.12.1 3.13.0
PYENV_BINS := $(strip $(foreach v,$(PYENV_VERSIONS),$(wildcard $(PYENV_ROOT)/versions/$(v)/bin)))
empty :=
space := $(empty) $(empty)
TOX_PATH := $(if $(PYENV_BINS),$(subst $(space),:,$(PYENV_BINS)):)$(PATH)

.PHONY: help venv test faults soak demo bench tox lint clean distclean

help:
	@echo "make venv | test | faults | soak | demo | bench | tox | lint | clean | distclean"
	@echo "  PYTEST_ARGS='-k foo -x' make test   (make test: the suite, then a cluster pass)"
	@echo "  SOAK_MINUTES=3 make soak             (default 20 minutes; not in CI)"

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install whenever the packaging metadata changes.
$(STAMP): setup.cfg pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	touch $@

# The modules run a second time against a Redis Cluster (KICKQ_TEST_TOPOLOGY=cluster, see
# tests/conftest.py): every feature of the library, supervisor, cron, hotjobs, observability and
# asyncio. Exit code 5 (PYTEST_ARGS selected none of them) is no failure.
CLUSTER_TESTS := tests/test_client.py tests/test_aio.py tests/test_cron.py tests/test_observe.py \
	tests/test_cli.py tests/test_functions.py tests/test_handoff.py tests/test_batches.py \
	tests/test_metrics.py tests/supervisor tests/test_scripts.py

# The test session starts its own redis-server (see tests/conftest.py), and the cluster pass its
# own Redis Cluster (3 masters, 3 replicas).
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)
	KICKQ_TEST_TOPOLOGY=cluster $(PY) -m pytest $(CLUSTER_TESTS) -m "not single_server and not fault" \
		$(PYTEST_ARGS) || [ $$? -eq 5 ]

# addopts has -m "not fault"; this later -m wins.
faults: venv
	$(PY) -m pytest -m fault -p no:cacheprovider $(PYTEST_ARGS)

# A long mixed load on a Redis Sentinel setup through worker kills and failovers, with lost,
# duplicated and stranded counts and the RSS of every long-lived process (tests/faults/soak.py).
# Not in CI. Exit status 1 when a target is missed.
SOAK_MINUTES ?= 20

soak: venv
	$(PY) -m tests.faults.soak --minutes $(SOAK_MINUTES)

demo: venv
	$(PY) examples/demo.py

# Peers go into their own virtualenv, never into .venv; arq (redis-py < 6) gets one of its own
# inside it. A peer that fails to install is reported as such in bench/RESULTS.md.
# make bench BENCH_ARGS="--jobs 2000 --runs 1"
BENCH_VENV := .bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

$(BENCH_PY):
	$(PYTHON) -m venv $(BENCH_VENV)

$(BENCH_STAMP): setup.cfg pyproject.toml bench/requirements.txt bench/requirements-arq.txt | $(BENCH_PY)
	$(BENCH_PY) -m pip install --upgrade pip
	$(BENCH_PY) -m pip install -e . -r bench/requirements.txt || { \
		echo "one peer did not install: installing them one by one"; \
		$(BENCH_PY) -m pip install -e . ; \
		sed -e 's/#.*//' -e '/^ *$$/d' bench/requirements.txt | while read -r req; do \
			$(BENCH_PY) -m pip install "$$req" || echo "$$req did not install"; \
		done; }
	-$(PYTHON) -m venv $(BENCH_VENV)/arq && $(BENCH_VENV)/arq/bin/python -m pip install -r bench/requirements-arq.txt \
		|| echo "arq did not install: bench/RESULTS.md will say so"
	touch $@

bench: $(BENCH_STAMP)
	$(BENCH_PY) -m bench $(BENCH_ARGS)

tox: venv
	$(PY) -m pip install --quiet 'tox>=4'
	PATH="$(TOX_PATH)" $(PY) -m tox -e py310-oldest,py313 $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

lint: venv
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check kickq supervisor tests bench

clean:
	rm -rf build dist .eggs *.egg-info .pytest_cache .mypy_cache .ruff_cache .tox .hypothesis
	find . -path ./$(VENV) -prune -o -path ./$(BENCH_VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(BENCH_VENV)
