"""The real ComfyUI, in-process, for tests: its source, a tiny model it loads, and that model patched
into the model samplings the dmsteps nodes serve.

Where the source is: ``ROOT/../shared/vendor/comfyui`` (the vendored copy beside a clone; see its
README), else the folder the environment variable ``DMSTEPS_COMFYUI`` names; neither: the tests that
use these fixtures are skipped with that reason. Found but not importable (a package ComfyUI imports
is missing): the tests fail, since the test extra of pyproject.toml installs what it needs.

What is loaded (once per test session; about 5 s of imports, 0.5 s for the model):

- ComfyUI as its README says it runs in-process: the source on ``sys.path`` (appended, so nothing of
  the project is shadowed), ``comfy.cli_args.args.cpu = True``, then ``comfy.sd``, ``comfy.samplers``,
  ``comfy.sample`` and ``comfy_extras.nodes_model_advanced``. torchvision and PyAV are imported by
  modules the tests never run (Stable Cascade's and Cosmos' models, the video API); where they are
  absent (no torchvision build matches the CPU torch here) stand-in modules answer those imports and
  are removed again once ComfyUI is loaded. transformers and diffusers record whether torchvision
  and PyAV are installed (at import or first ask); they are asked before the stand-ins exist, so the
  rest of the test session sees the truth.
- a tiny UNet with random weights that ComfyUI's model detection reads as SD 2.x (``SD20``: model
  channels 320, context 1024, linear transformer projection; one level, one res block, 26M
  parameters, float16 safetensors), loaded by ``comfy.sd.load_diffusion_model`` into a real
  ModelPatcher;
- patched by ComfyUI's own ModelSampling nodes: ``MODELS`` lists the patched models by name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "DMSTEPS_COMFYUI"
STAND_INS = ("torchvision", "av")  # imported at module level by ComfyUI modules the tests do not run
LATENT_SHAPE = (1, 4, 8, 8)  # SD's 4 latent channels, 8 x 8: the tiny UNet's one level needs no more
CONTEXT_SHAPE = (1, 77, 1024)  # SD 2.x's text conditioning

# name -> (ComfyUI node class in comfy_extras.nodes_model_advanced, its patch arguments after the model)
MODELS = {
    "sd": None,  # as loaded: ModelSamplingDiscrete, eps (SD 2.x's scaled_linear betas)
    "sd3": ("ModelSamplingSD3", {"shift": 3.0}),  # discrete flow, shift 3
    "flow1": ("ModelSamplingSD3", {"shift": 1.0}),  # discrete flow, shift 1 (FLUX.1-schnell's)
    "flux": ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024}),
    "edm": ("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.002}),
    "edm120": ("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 120.0, "sigma_min": 0.002}),
    "lcm": ("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}),
}


def comfyui_source() -> Path | None:
    """The ComfyUI source folder: the vendored copy beside the clone, else ``$DMSTEPS_COMFYUI``."""
    for candidate in (ROOT.parent / "shared" / "vendor" / "comfyui", os.environ.get(ENV_VAR)):
        if candidate and (Path(candidate) / "comfy" / "samplers.py").is_file():
            return Path(candidate).resolve()
    return None


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the packages in ``names`` (and their submodules) with empty modules whose
    every public attribute is a placeholder class: enough for ``import x`` and ``from x import Y``."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attr, _owner=spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {"__module__": _owner})

        module.__getattr__ = placeholder
        return module

    def exec_module(self, module):
        pass


def _absent(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # absent, or a build that does not match torch: either way ComfyUI cannot use it
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        return True
    return False


def _settle_availability_checks(names) -> None:
    """Have transformers and diffusers record now, without stand-ins, whether the packages ``names``
    are installed: their ``is_<name>_available`` answers are computed once and kept."""
    for library in ("transformers.utils", "diffusers.utils"):
        try:
            module = importlib.import_module(library)
        except Exception:  # not installed: nothing records anything
            continue
        for attr in dir(module):
            if attr.startswith("is_") and attr.endswith("_available") and any(n in attr for n in names):
                try:
                    getattr(module, attr)()
                except TypeError:  # one that needs arguments (a version to compare with)
                    pass


@dataclass
class Comfy:
    """The imported ComfyUI modules the tests use."""

    source: Path
    sd: types.ModuleType
    samplers: types.ModuleType
    sample: types.ModuleType
    advanced: types.ModuleType  # comfy_extras.nodes_model_advanced


def import_comfy(source: Path) -> Comfy:
    """ComfyUI's modules from ``source``, imported as its README says (see the module docstring)."""
    if str(source) not in sys.path:
        sys.path.append(str(source))
    missing = [name for name in STAND_INS if _absent(name)]
    _settle_availability_checks(missing)
    finder = _StandIns(missing)
    sys.meta_path.insert(0, finder)
    try:
        from comfy.cli_args import args

        args.cpu = True
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        from comfy_extras import nodes_model_advanced
    finally:
        sys.meta_path.remove(finder)
        for key in [k for k in sys.modules if k.split(".")[0] in finder.names]:
            del sys.modules[key]
    assert Path(comfy.sd.__file__).resolve().is_relative_to(source), comfy.sd.__file__
    return Comfy(source, comfy.sd, comfy.samplers, comfy.sample, nodes_model_advanced)


def save_tiny_unet(path: Path, scale: float = 0.02) -> Path:
    """A random UNet that ComfyUI's detection reads as SD 2.x, saved as float16 safetensors at ``path``:
    every weight normal with standard deviation ``scale`` (larger: a less linear denoiser)."""
    import comfy.ops
    import safetensors.torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                     transformer_depth_middle=1, context_dim=1024, use_linear_in_transformer=True,
                     num_head_channels=64, use_spatial_transformer=True, legacy=False,
                     operations=comfy.ops.disable_weight_init)  # no initialisation: the weights are set below
    generator = torch.Generator().manual_seed(0)
    weights = {key: (torch.randn(value.shape, generator=generator) * scale).to(torch.float16)
               for key, value in unet.state_dict().items()}
    safetensors.torch.save_file(weights, str(path))
    return path


def patched(comfy: Comfy, model, name: str):
    """``model`` patched by ComfyUI's own ModelSampling node for ``name`` (``MODELS``)."""
    if MODELS[name] is None:
        return model
    node, kwargs = MODELS[name]
    (out,) = getattr(comfy.advanced, node)().patch(model, **kwargs)
    return out


def model_calls(comfy: Comfy, model, sigmas, sampler_name: str) -> list[float]:
    """Run ComfyUI's ``sampler_name`` on ``model`` with ``sigmas`` through ``comfy.sample.sample_custom``
    (what SamplerCustom runs; cfg 1, so one model call per evaluation) and return the sigma of every
    call of the diffusion model, in order."""
    model = model.clone()
    calls = []

    def counting(apply_model, params):
        calls.extend(float(s) for s in params["timestep"].reshape(-1)[:1])
        return apply_model(params["input"], params["timestep"], **params["c"])

    model.set_model_unet_function_wrapper(counting)
    cond = [[torch.zeros(CONTEXT_SHAPE), {}]]
    latent = torch.zeros(LATENT_SHAPE)
    noise = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object(sampler_name), sigmas, cond,
                                   cond, latent, disable_pbar=True, seed=0)
    return calls


@pytest.fixture(scope="session")
def comfy() -> Comfy:
    source = comfyui_source()
    if source is None:
        pytest.skip(f"no ComfyUI source: neither {ROOT.parent / 'shared' / 'vendor' / 'comfyui'} nor ${ENV_VAR}")
    torch.set_num_threads(1)
    return import_comfy(source)


@pytest.fixture(scope="session")
def comfy_models(comfy, tmp_path_factory) -> dict:
    """Every model of ``MODELS``, by name: real ModelPatchers of the tiny SD 2.x UNet."""
    path = save_tiny_unet(tmp_path_factory.mktemp("comfy") / "tiny-sd2.safetensors")
    base = comfy.sd.load_diffusion_model(str(path))
    assert type(base.model.model_config).__name__ == "SD20", type(base.model.model_config)
    return {name: patched(comfy, base, name) for name in MODELS}
