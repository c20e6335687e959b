VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test bench zoo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/compile.py
	$(PY) benchmarks/pretrained.py
	$(PY) benchmarks/continual.py

zoo: install
	$(PY) benchmarks/timm_zoo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
