# `make` alone prints this help. Every target creates .venv and installs the package if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GPU ?= 0
# GPU=1: the [gpu] extra (tensorflow[and-cuda]) in place of tensorflow-cpu, in its own stamp
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu,)
comma := ,
EXTRAS := dev$(if $(filter 1,$(GPU)),$(comma)gpu,)
SAMPLE := sample_data
ART := artifacts

.DEFAULT_GOAL := help
.PHONY: help install all prepare train evaluate predict serve export test lint bench bench-serve bench-cache bench-export bench-audit bench-calibration bench-resilience bench-unknown bench-backbone clean

help: ## Show every target with one line
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
ifeq ($(GPU),1)
	# tensorflow-cpu and tensorflow share their files: remove the CPU one, then lay the GPU one down again
	$(BIN)/python -m pip uninstall -q -y tensorflow-cpu || true
	$(BIN)/python -m pip install -q --force-reinstall --no-deps "tensorflow==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')"
endif
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with its dev tools (GPU=1: with CUDA TensorFlow)

all: prepare train evaluate predict ## Run the whole pipeline on sample_data/ (prepare, train, evaluate, predict)

prepare: $(STAMP) ## Prepare sample_data/ into artifacts/data
	$(BIN)/pipeline prepare $(SAMPLE) --no-flip  # mirrored digits are other symbols

train: $(STAMP) ## Train the CNN on artifacts/data into artifacts/model
	$(BIN)/pipeline train

evaluate: $(STAMP) ## Evaluate on the test split into artifacts/reports
	$(BIN)/pipeline evaluate

predict: $(STAMP) ## Predict a few sample images with the trained model
	$(BIN)/pipeline predict $(SAMPLE)/3/digit_0003.png $(SAMPLE)/7/digit_0007.png --top-k 3

serve: $(STAMP) ## Serve artifacts/model on http://127.0.0.1:8000 (the page at /, the API at /docs)
	$(BIN)/pipeline serve

export: $(STAMP) ## Export artifacts/model to every format (int8 LiteRT, ONNX, OpenVINO, SavedModel), each checked
	for f in litert-int8 onnx openvino saved-model; do $(BIN)/pipeline export --format $$f || exit 1; done

test: $(STAMP) ## Run the test suite
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## Lint and check formatting with ruff
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench

bench: $(STAMP) ## Every benchmark: the reference scripts in ../shared/bench, then each bench-* below (hours; not CI)
	$(BIN)/python bench/run_bench.py
	$(MAKE) bench-audit bench-calibration bench-cache bench-export bench-resilience bench-unknown

bench-audit: $(STAMP) ## The audit on the letters folder with 5% planted wrong labels: precision, recall, time, accuracy won back
	$(BIN)/python bench/audit_bench.py --make-letters

bench-serve: $(STAMP) ## Load-test pipeline serve on loopback against cold predict processes (not part of CI)
	$(BIN)/python bench/serve_load.py

bench-cache: $(STAMP) ## prepare's per-file cache: fresh against re-runs after 1 % changes, 20,000 photos (slow)
	$(BIN)/python bench/cache_bench.py

bench-export: $(STAMP) ## Each export's size, accuracy, agreement with Keras and latency on sample_data and the letters
	$(BIN)/python bench/export_bench.py

bench-calibration: $(STAMP) ## Calibration, unsure and TTA on the letters, the case letters and sample_data (slow; not CI)
	test -d bench/work/letters || $(BIN)/python ../shared/bench/make_letters_folder.py bench/work/letters
	test -d bench/work/cases || $(BIN)/python ../shared/bench/make_letters_folder.py bench/work/cases --letters CcKkOoPpSsUuVvWwXxZz
	$(BIN)/python bench/calibration_bench.py bench/work/letters bench/work/cases $(SAMPLE) --work bench/work/calibration

bench-unknown: $(STAMP) ## "unknown": novelty against max softmax, the letters against sample_data, stamps, Fashion-MNIST, emoji, silhouettes and back; cost per image
	test -d bench/work/letters || $(BIN)/python ../shared/bench/make_letters_folder.py bench/work/letters
	test -d bench/work/stamps || $(BIN)/python ../shared/bench/make_real_folder.py stamps bench/work/stamps
	test -d bench/work/fashion || $(BIN)/python ../shared/bench/make_real_folder.py fashion bench/work/fashion --per-class 100
	test -d bench/work/foreign/emoji || $(BIN)/python bench/make_foreign_folders.py emoji bench/work/foreign
	test -d bench/work/foreign/silhouettes || $(BIN)/python bench/make_foreign_folders.py silhouettes bench/work/foreign
	$(BIN)/python bench/unknown_bench.py bench/work/letters $(SAMPLE) bench/work/stamps bench/work/fashion \
		--foreign bench/work/foreign/emoji bench/work/foreign/silhouettes --work bench/work/unknown --timing

bench-backbone: $(STAMP) ## The CNN against train --backbone on the shared stamps and Fashion-MNIST: accuracy, time, features/s, memory (slow; not CI)
	$(BIN)/python bench/backbone_bench.py

bench-resilience: $(STAMP) ## Kill-and-resume, the server under 64 clients, 20,000 fuzzed images (not part of CI)
	$(BIN)/python bench/resume_bench.py --epochs 6 --kills 3
	$(BIN)/python bench/resume_bench.py --epochs 6 --kills 2 --cluster
	$(BIN)/python bench/serve_load.py --flood --clients 64 --requests 256
	$(BIN)/python bench/fuzz_images.py --examples 20000

clean: ## Remove artifacts, caches and the virtual environment
	rm -rf $(ART) $(VENV) .pytest_cache .ruff_cache bench/work *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
