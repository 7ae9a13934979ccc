# Set-up from nothing: every target creates .venv and installs the pinned versions when needed.
# A second run is fast: the install is redone only when requirements/ or pyproject.toml change.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q
LOCK    := requirements/cpu.lock

.PHONY: install test demo lint bench bench-quality clean

$(STAMP): $(LOCK) requirements/torchrec.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing pinned requirements into $(VENV) (first time: ~2 minutes)"
	$(PIP) install -r $(LOCK) > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	$(PIP) install --no-deps -r requirements/torchrec.txt >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	$(PIP) install --no-deps --no-build-isolation -e . >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, ray, mlflow; print('torch', torch.__version__, '| torchrec', torchrec.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

demo: $(STAMP)
	$(BIN)/tokenrec demo

# The performance suite (issue 7): each script prints its table and rewrites its JSON under
# benchmarks/results/, which docs/benchmarks.md quotes. Under 20 minutes on 2 cores.
PERF_BENCH := generator attention tokenformer throughput torchrec_reference field_scale serving candidates export dense_parallel
bench: $(STAMP)
	@set -e; t0=$$(date +%s); for b in $(PERF_BENCH); do \
	  echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py; done; \
	  echo "== make bench: $$(( $$(date +%s) - t0 )) s"

# Model quality (docs/quality.md, issue 17): the tokenrec tune studies (collapse, its ablations, the
# wave-1 demo world, ML-100K), each resumable — its runs'
# results are kept under benchmarks/results/studies/<name>/ (summary.json, summary.md), so an
# interrupted `make bench-quality` goes on where it stopped. Hours on 2 cores.
QWORK ?= /tmp/tokenrec-quality
bench-quality: $(STAMP)
	@set -e; \
	test -d $(QWORK)/collapse-data || $(BIN)/tokenrec generate --config configs/collapse.toml \
	  --days 2026-01-01..2026-01-05 --out $(QWORK)/collapse-data; \
	$(BIN)/tokenrec tune --config configs/collapse.toml --study configs/studies/collapse.toml \
	  --data $(QWORK)/collapse-data --workdir $(QWORK)/collapse --results benchmarks/results/studies/collapse; \
	$(BIN)/tokenrec tune --config configs/collapse.toml --study configs/studies/collapse_epochs.toml \
	  --data $(QWORK)/collapse-data --workdir $(QWORK)/collapse --results benchmarks/results/studies/collapse_epochs; \
	$(BIN)/tokenrec tune --config configs/collapse.toml --study configs/studies/collapse_ablations.toml \
	  --data $(QWORK)/collapse-data --workdir $(QWORK)/collapse --results benchmarks/results/studies/collapse_ablations; \
	$(BIN)/tokenrec tune --config configs/collapse.toml --study configs/studies/collapse_layout.toml \
	  --data $(QWORK)/collapse-data --workdir $(QWORK)/collapse --results benchmarks/results/studies/collapse_layout; \
	test -d $(QWORK)/demo-world-data || $(BIN)/tokenrec generate --config configs/demo_world.toml \
	  --days 2026-01-01..2026-01-04 --out $(QWORK)/demo-world-data; \
	$(BIN)/tokenrec tune --config configs/demo_world.toml --study configs/studies/demo_world.toml \
	  --data $(QWORK)/demo-world-data --workdir $(QWORK)/demo-world --results benchmarks/results/studies/demo_world; \
	$(BIN)/tokenrec data fetch ml-100k; \
	$(BIN)/tokenrec tune --config configs/movielens.toml --study configs/studies/movielens.toml \
	  --data $$HOME/.cache/tokenrec/ml-100k/logs --workdir $(QWORK)/ml100k --results benchmarks/results/studies/ml100k; \
	$(BIN)/tokenrec tune --config configs/movielens.toml --study configs/studies/movielens_tables.toml \
	  --data $$HOME/.cache/tokenrec/ml-100k/logs --workdir $(QWORK)/ml100k --results benchmarks/results/studies/ml100k_tables; \
	$(BIN)/tokenrec tune --config configs/movielens.toml --study configs/studies/movielens_tokenformer.toml \
	  --data $$HOME/.cache/tokenrec/ml-100k/logs --workdir $(QWORK)/ml100k --results benchmarks/results/studies/ml100k_tokenformer; \
	$(BIN)/tokenrec tune --config configs/movielens.toml --study configs/studies/movielens_layout.toml \
	  --data $$HOME/.cache/tokenrec/ml-100k/logs --workdir $(QWORK)/ml100k --results benchmarks/results/studies/ml100k_layout

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .tokenrec
