# Two commands: `make demo` and `make test`. Each sets up what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: setup test test-deploy demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The whole Flower deployment on loopback (SuperLink + SuperNodes, TLS, node auth): ~3 min.
test-deploy: setup
	$(PY) -m pytest -q -m deploy

demo: setup
	$(PY) -m dqc.demo --out $(DEMO_OUT)

bench: setup
	$(PY) -m dqc.bench --out bench_out

clean:
	rm -rf $(VENV) $(DEMO_OUT) bench_out .pytest_cache
