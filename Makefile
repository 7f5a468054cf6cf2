# The front door. Every target uses the project's own virtual environment.
PY      := .venv/bin/python
DATA    ?= demo
OUT     ?= data
SRC     ?=
FORMATS ?= beton,rec
CONFIG  ?= configs/demo.yaml
ARGS    ?=
EXPORT  ?= backbone.pth

# The data step that another target runs first (train, learn-check, train-graph). It passes only the data
# step's own variables: the user's ARGS, SRC, NAME, MAX_SIDE, QUALITY and FORMATS belong to the step they
# called, so they are cleared on the sub-make's command line (which wins over inherited variables).
DATA_STEP = $(MAKE) --no-print-directory dataset OUT=$(OUT) ARGS= SRC= NAME= MAX_SIDE= QUALITY= FORMATS=beton,rec
# With OUT set, the training step reads the data it just wrote there (the presets say data/...).
DATA_OVERRIDE = $(if $(filter-out data,$(OUT)),data=$(OUT)/$(1))

.PHONY: help setup test train learn-check train-graph dataset bench gpu-check gpu-wheels eval export lint

help:
	@echo "Each target lists the variables it reads; ARGS always go to the target's own tool."
	@echo "make setup            create .venv/ and install ressl with all extras (+ Debian packages FFCV needs, as root)"
	@echo "make train            demo dataset (if missing) + a short demo run with kNN before/after"
	@echo "                      reads CONFIG OUT ARGS   e.g. make train ARGS=\"seed=1\" (training overrides key=value)"
	@echo "make learn-check      demo data: random init vs MoCo v2 vs ReSSL (1x, 3x) vs TPAMI vs relation + instance term, one budget (table + JSON)"
	@echo "                      reads CONFIG OUT SEEDS ARGS   e.g. make learn-check SEEDS=3 (seeds 0,1,2: mean +- sd)"
	@echo "make train-graph      digits k-NN graph (if missing) + a short RGRL run with node accuracy before/after"
	@echo "                      reads OUT ARGS"
	@echo "make test             run the test suite (CPU)"
	@echo "make dataset DATA=... write OUT/NAME/ (ImageFolder, .beton, .rec)"
	@echo "                      reads DATA OUT SRC FORMATS WORKERS MAX_SIDE QUALITY ARGS (ARGS: tools/dataset.py flags)"
	@echo "make dataset DATA=planetoid SRC=DIR NAME=Cora|CiteSeer|PubMed, DATA=karate, DATA=digits-knn   graph.pt"
	@echo "                      reads DATA OUT SRC NAME ARGS"
	@echo "make bench ARGS=...   images/s of loaders, model step and end to end (JSON); reads ARGS"
	@echo "make gpu-check        the prepared GPU run (env, CUDA tests, rates, training); ARGS=\"--cpu\" on CPU; reads ARGS GPU_PY"
	@echo "make gpu-wheels       FFCV (self-contained, CPython 3.12) + DALI wheels in carry parts: .device/parts, .device/CARRY"
	@echo "                      reads ARGS   e.g. make gpu-wheels ARGS=--check (also installs them in a 3.12 venv and tests)"
	@echo "make eval CKPT=...    kNN + linear probe + t-SNE of a checkpoint; reads CKPT ARGS"
	@echo "make export CKPT=... EXPORT=backbone.pth   torchvision state_dict of the trained backbone; reads CKPT EXPORT ARGS"
	@echo "make lint             ruff"

setup:
	@echo "==> Debian packages for FFCV (libturbojpeg, OpenCV, pkg-config)"
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libturbojpeg0-dev libopencv-dev pkg-config >/dev/null; \
	else echo "    (not root or no apt-get: install libturbojpeg0-dev libopencv-dev pkg-config yourself for the [ffcv] extra)"; fi
	@echo "==> virtual environment .venv/"
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	@echo "==> torch + torchvision (matching pair), then ressl editable with [dali,ffcv,graph,dev]"
	$(PY) -m pip install -q "torch>=2.9,<2.15" "torchvision>=0.24,<0.30"
	$(PY) -m pip install -q -e ".[dali,ffcv,graph,dev]"
	$(PY) -c "import torch, torchvision, pipelines; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'backends', pipelines.available_backends())"

test:
	@echo "==> pytest (CPU)"
	$(PY) -m pytest -q

GRAPH_DATA := planetoid karate digits-knn

dataset:
ifneq ($(filter $(DATA),$(GRAPH_DATA)),)
	@echo "==> tools/graph_dataset.py $(DATA) -> $(OUT)/"
	$(PY) tools/graph_dataset.py $(DATA) --out $(OUT) $(if $(SRC),--src $(SRC)) $(if $(NAME),--name $(NAME)) $(ARGS)
else
	@echo "==> tools/dataset.py $(DATA) -> $(OUT)/$(DATA)"
	$(PY) tools/dataset.py $(DATA) --out $(OUT) $(if $(SRC),--src $(SRC)) --formats $(FORMATS) \
		$(if $(MAX_SIDE),--max-side $(MAX_SIDE)) $(if $(QUALITY),--quality $(QUALITY)) $(if $(WORKERS),--workers $(WORKERS)) $(ARGS)
endif

train:
	@test -d $(OUT)/demo/train || $(DATA_STEP) DATA=demo
	@echo "==> demo training run ($(CONFIG))"
	$(PY) tools/train.py --config $(CONFIG) $(call DATA_OVERRIDE,demo) $(ARGS)

learn-check:
	@test -d $(OUT)/demo/train || $(DATA_STEP) DATA=demo
	@echo "==> tools/learncheck.py ($(CONFIG)): every variant at one budget$(if $(SEEDS), $(SEEDS) seeds from 0) -> runs/learncheck/learncheck.md, .json"
	$(PY) tools/learncheck.py --config $(CONFIG) $(if $(SEEDS),--num-seeds $(SEEDS)) $(call DATA_OVERRIDE,demo) $(ARGS)

train-graph:
	@test -f $(OUT)/digits-knn/graph.pt || $(DATA_STEP) DATA=digits-knn
	@echo "==> RGRL demo run (configs/rgrl-digits.yaml)"
	$(PY) tools/train_graph.py --config configs/rgrl-digits.yaml $(call DATA_OVERRIDE,digits-knn) $(ARGS)

bench:
	@echo "==> tools/bench.py $(ARGS)"
	$(PY) tools/bench.py $(ARGS)

# The GPU machine is bare (no .venv): fall back to its own python3, with the checkout on PYTHONPATH.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@echo "==> tools/gpucheck.py $(ARGS) (gpucheck.json + gpucheck.md; python: $(GPU_PY))"
	PYTHONPATH=. $(GPU_PY) tools/gpucheck.py $(ARGS)

gpu-wheels:
	@echo "==> tools/gpu_wheels.py $(ARGS) (build/gpu-wheels/, then .device/parts + .device/CARRY)"
	$(PY) tools/gpu_wheels.py $(ARGS)

eval:
	@echo "==> tools/eval.py $(CKPT)"
	$(PY) tools/eval.py --ckpt $(CKPT) $(ARGS)

export:
	@echo "==> tools/export.py $(CKPT) -> $(EXPORT)"
	$(PY) tools/export.py --ckpt $(CKPT) --out $(EXPORT) $(ARGS)

lint:
	@echo "==> ruff"
	$(PY) -m ruff check ressl pipelines tools tests
