# dmsteps: `make demo` and `make test` install what they need into .venv first: `make demo` the core package
# alone (numpy, scipy, typer, rich, pyyaml, threadpoolctl: no torch), `make test` everything the tests need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DMSTEPS := $(VENV)/bin/dmsteps
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
CORE_STAMP := $(VENV)/.core-stamp

.PHONY: install install-core demo test bench clean gpu-check gpu-bench gpu-wheels study study-data study-unet study-unet-patches study-guided digits-model patches-model digits-cond-model digits-sd proxies study-robust study-warp tables

# Independent checks (tests/test_kdiffusion.py, tests/test_diffusers_oldest.py): k-diffusion's samplers, installed
# without its dependencies (its metadata pulls torchvision, wandb, kornia, ... and can replace torch) plus what its
# sampling module imports, all pinned; torch must be the same release afterwards. And the oldest diffusers that
# pyproject.toml allows (the floor of its diffusers extras), in a folder of its own that the test puts first on
# PYTHONPATH.
KDIFFUSION_SPECS := k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 torchdiffeq==0.2.5
KDIFFUSION_STAMP := $(VENV)/.kdiffusion-stamp
DIFFUSERS_OLDEST := 0.32.0
OLDEST_DIR := .deps/diffusers-oldest
OLDEST_STAMP := $(OLDEST_DIR)/.installed-stamp
TORCH_RELEASE := $(PY) -c "from importlib.metadata import version; print(version('torch'))"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

$(KDIFFUSION_STAMP): $(STAMP) Makefile
	$(TORCH_RELEASE) > $(VENV)/.torch-release
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(KDIFFUSION_SPECS)
	$(TORCH_RELEASE) | cmp -s - $(VENV)/.torch-release || { echo "torch changed: was $$(cat $(VENV)/.torch-release)"; exit 1; }
	touch $(KDIFFUSION_STAMP)

$(OLDEST_STAMP): $(STAMP) Makefile
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target $(OLDEST_DIR) \
	  diffusers==$(DIFFUSERS_OLDEST)
	touch $(OLDEST_STAMP)

install: $(STAMP) $(KDIFFUSION_STAMP) $(OLDEST_STAMP)

# The core package only (what `pip install .` gives): optimize, show, check, tables, schedules. After a full
# install it is already there.
$(CORE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	test -f $(STAMP) -a $(STAMP) -nt pyproject.toml || $(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(CORE_STAMP)

install-core: $(CORE_STAMP)

# The main job on the built-in default: Stable Diffusion's schedule, UniPC order 3, NFE 5..15: the
# default steps (chosen from measurements), then the paper's optimized table for comparison. numpy only.
demo: install-core
	mkdir -p build
	$(DMSTEPS) optimize --nfe 5..15 --solver unipc -o build/demo.json
	$(DMSTEPS) optimize --nfe 5..15 --solver unipc --objective reference -o build/demo-optimized.json
	@echo "--- NFE 10, model timesteps: default steps, then the optimized table:"
	$(DMSTEPS) show build/demo.json --nfe 10 --as timesteps
	$(DMSTEPS) show build/demo-optimized.json --nfe 10 --as timesteps

test: install
	$(PY) -m pytest

# A demo checkpoint: the digits Gaussian mixture (exact denoiser) on Stable Diffusion's schedule, to try
# `dmsteps evaluate -c build/digits-sd.npz -t sd-unipc-o3` (every grid and named schedule that fits).
digits-sd: install
	mkdir -p build
	$(PY) -c "from studies.proxy_data import digits_mixture; from dmsteps_cli.mixtures import save_mixture; \
	save_mixture(digits_mixture(), 'build/digits-sd.npz', schedule='scaled_linear')"

# Ready-made tables (tables/*.json, index.json, README.md): deterministic, checked in CI by tests/test_tables_dir.py.
tables: install
	$(PY) scripts/make_tables.py

# The research studies, run as `python -m studies.NAME` (docs/research/README.md: each report, its command, its run
# time; studies/README.md: what they need). Not part of the product.
# The evaluation study: docs/research/evaluation.md (measured errors on the digits ideal denoiser), about 17 minutes.
study: install
	$(PY) -m studies.study

# Do the best steps depend on the data? Three data sets; chooses the default steps: docs/research/evaluation-data.md,
# about 9 minutes.
study-data: install
	$(PY) -m studies.study_data

# The same on the trained digits UNet (build/digits-model, trained first if missing): docs/research/evaluation-unet.md,
# about 5 minutes.
study-unet: install
	test -d build/digits-model/unet || $(MAKE) digits-model
	$(PY) -m studies.study_unet

# Model-free steps fitted across the closed-form proxies, judged by leave-one-proxy-out (studies/robust_fit.py):
# four families x UniPC-3 and DPM-Solver++-3, NFE 5..15, one line per NFE and fold in build/robust/results.jsonl;
# stopped, it resumes where it was. Then the summary against the goal.
ROBUST_OUT ?= build/robust/results.jsonl
study-robust: install
	for f in scaled_linear linear edm flow-shift3; do for s in unipc dpmpp; do \
	  $(PY) -m studies.robust_fit --family $$f --solver $$s --order 3 --nfe 5..15 --out $(ROBUST_OUT) || exit 1; \
	done; done
	$(PY) -m studies.robust_fit --summary --out $(ROBUST_OUT)

# One warp of the steps for all NFE, fitted across the closed-form proxies and judged by leave-one-proxy-out
# (docs/research/robust-steps.md): every shipped family x UniPC and DPM-Solver++ x order 3 and 2, two fits at a time, each into
# build/warp/fits/FAMILY-SOLVER-oORDER.jsonl (stopped, it resumes where it was); then the fitted warps on the two
# trained UNets (trained first if missing) and the report in build/warp/report.md. FAMILIES, SOLVERS, ORDERS, JOBS,
# OUTDIR: see studies/warp.sh.
study-warp: install
	PYTHON=$(PY) bash studies/warp.sh

# refine on the class-conditional digits UNet (build/digits-cond-model, trained first if missing) at guidance 1 and 3:
# docs/research/evaluation-guided.md. SCALES, NFE, MAXITER, TRAIN, VALIDATION, HOLDOUT, OUTDIR: see studies/guided.sh.
study-guided: install
	PYTHON=$(PY) bash studies/guided.sh

bench: install
	$(PY) benchmarks/bench_optimize.py
	$(PY) benchmarks/bench_sample.py
	PYTHONPATH=.:$$PYTHONPATH $(PY) benchmarks/bench_refine.py

# On a machine with CUDA (the GPU image has python3.12 and torch but no diffusers: run
# `make gpu-wheels` here first and carry .whl/, then on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site make gpu-check)
# docs/research/gpu-check.md records its output. The GPU studies run the same way, by hand, from the repository root:
# python3 -m studies.gpu_refine_check (docs/research/gpu-check.md, last part) and studies/gpu_evaluate.sh
# (docs/research/evaluation-4096.md).
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=.:$$PYTHONPATH $(GPU_PYTHON) tests/gpu_check.py

# refine on a GPU at published model sizes, random weights (docs/benchmarks.md, "refine on a GPU"): the whole
# refine of a CIFAR-10-size UNet and one gradient's memory for a Stable-Diffusion-1.5-size UNet. Run like gpu-check;
# writes GPU_BENCH_OUT/gpu-bench.json, the random model and a new reference cache there. Not yet run on a GPU.
GPU_BENCH_OUT ?= build/gpu-bench
gpu-bench:
	PYTHONPATH=.:$$PYTHONPATH $(GPU_PYTHON) benchmarks/gpu_refine.py --out $(GPU_BENCH_OUT)

gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp

# The same on a UNet trained on photo patches with Stable Diffusion's betas: docs/research/evaluation-unet-patches.md,
# about 4 minutes (and 2-3 to train the model if missing).
study-unet-patches: install
	test -d build/patches-model/unet || $(MAKE) patches-model
	$(PY) -m studies.study_unet --model build/patches-model --tag patches

# A small pixel-space DDPM (UNet2DModel, epsilon, linear betas) on sklearn's 8x8 digits: CPU, about 3 minutes.
digits-model: install
	$(PY) -m studies.train_digits --out build/digits-model

# The same network on sklearn's grey photo patches with Stable Diffusion's betas: CPU, 2-3 minutes.
patches-model: install
	$(PY) -m studies.train_digits --out build/patches-model --data patches --betas scaled_linear

# The same network class-conditional, for classifier-free guidance: num_class_embeds 11, the digits 0-9 and a null
# class 10 that replaces 15% of the training labels (build/digits-cond-model/unet/class_conditioning.json names it).
digits-cond-model: install
	$(PY) -m studies.train_digits --out build/digits-cond-model --class-conditional

# The proxy data sets (docs/research/proxies.md): every closed-form proxy as build/proxies/NAME.npz, each recording the
# schedule PROXY_SCHEDULE (default: scaled_linear), and a table of what it wrote; about 5 s. The trained proxies are
# not retrained here: make digits-model, make patches-model, make digits-cond-model.
PROXY_SCHEDULE ?=
proxies: install
	$(PY) -m studies.make_proxies --out build/proxies $(if $(PROXY_SCHEDULE),--schedule $(PROXY_SCHEDULE))

clean:
	rm -rf build .pytest_cache .deps
