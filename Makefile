# dmsteps: `make demo` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DMSTEPS := $(VENV)/bin/dmsteps
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean digits-model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in default: Stable Diffusion's schedule, UniPC order 3, NFE 5..15.
demo: install
	mkdir -p build
	$(DMSTEPS) optimize --nfe 5..15 --solver unipc -o build/demo.json
	@echo "--- build/demo.json, NFE 10, model timesteps:"
	$(DMSTEPS) show build/demo.json --nfe 10 --as timesteps

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_optimize.py

# A small pixel-space DDPM (UNet2DModel, epsilon, linear betas) on sklearn's 8x8 digits: CPU, a few minutes.
digits-model: install
	$(PY) scripts/train_digits.py --out build/digits-model

clean:
	rm -rf build .pytest_cache
