"""The model registry: one record per model people sample today, with the facts a table for it
depends on and where each fact is read.

A record names the model's schedule (a preset of ``schedules.PRESETS``: ``scaled_linear`` for the
Stable Diffusion family, ``flow`` for rectified-flow models), and for flow models the shift ``s``
its runtime samples with, always in one convention: the time grid t = s u / (1 + (s - 1) u)
(``grids.shift_time``; ComfyUI's ``time_snr_shift``, diffusers' ``shift``). ComfyUI's
``ModelSamplingFlux`` (FLUX.1-dev, Chroma, Qwen-Image, LTX-Video) holds mu instead, the same
grid with s = e^mu (``flux_time_shift(mu, 1, t)``); the record keeps the value ComfyUI's file
holds (``comfyui_setting``) and converts it once (``Sampling.shift_of``).

Where runtimes disagree (Wan 2.1: ComfyUI 8.0, diffusers' example 3.0 at 480p and 5.0 at 720p;
Wan 2.2: ComfyUI 8.0, Wan's own code 12.0 or 5.0) each runtime's value is a ``Setting`` of the
record, and the runtime the record's tables follow is ``shift_from``; diffusers' Wan 2.1 settings
are records of their own (``wan21-480p``, ``wan21-720p``).

``sampler``/``order``: the solver (a ``solvers.SOLVERS`` name or alias) the model's runtime
defaults to; ``steps``: the step counts its runtimes default to; ``published``: the published
step lists for it (``baselines.NAMED_SCHEDULES``); ``distilled``: for models whose steps were
fixed by training, what to run instead of a table (None otherwise); ``expert_switch``: the sigma
at which a two-expert model (Wan 2.2 A14B) hands over from its high-noise to its low-noise expert.

``tables_for(name)`` finds the ready-made table for a model: its own (``{table_stem}-euler``,
``{table_stem}-{solver}-o{order}``) where the tables folder holds it, else the family table that
applies (same schedule, the nearest shift) with a note saying what differs.

Imports ``errors`` at load; ``tables``, ``solvers`` and ``grids`` on use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import BadInput

COMFYUI = "comfy/supported_models.py"  # the vendored ComfyUI's file of model settings
COMFYUI_NODES = "comfy_extras/nodes_model_advanced.py"
KSAMPLER_DEFAULTS = "nodes.py KSampler.INPUT_TYPES: steps default 20, sampler_name euler (first of KSAMPLER_NAMES)"
SHIFT_RTOL = 1e-6  # flow shifts that differ by less are the same (ComfyUI holds Flux's mu as given)

# FLUX.1-dev's resolution-dependent shift: mu = base_shift + (max_shift - base_shift)
# (tokens - BASE_TOKENS) / (MAX_TOKENS - BASE_TOKENS), tokens = width height / 256 (8x VAE, 2x2
# patches); ComfyUI's ModelSamplingFlux node (comfy_extras/nodes_model_advanced.py, defaults
# max_shift 1.15, base_shift 0.5) and diffusers' calculate_shift (pipelines/flux/pipeline_flux.py,
# defaults base_seq_len 256, max_seq_len 4096, base_shift 0.5, max_shift 1.15) agree
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15
FLUX_BASE_TOKENS, FLUX_MAX_TOKENS = 256, 4096
FLUX_PIXELS_PER_TOKEN = 16 * 16


def flux_mu(width: int, height: int) -> float:
    """FLUX.1-dev's mu at a width x height image (pixels): ln of its shift."""
    tokens = width * height / FLUX_PIXELS_PER_TOKEN
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_TOKENS - FLUX_BASE_TOKENS)
    return FLUX_BASE_SHIFT + slope * (tokens - FLUX_BASE_TOKENS)


@dataclass(frozen=True)
class Sampling:
    """A ComfyUI model sampling class and how its ``shift`` setting maps to the grid shift s."""

    name: str  # comfy/model_sampling.py class
    model_type: str  # comfy.model_base.ModelType that selects it (model_base.model_sampling)
    default: float | None  # the shift setting when sampling_settings has none
    exponential: bool  # the setting is mu, s = e^mu (ModelSamplingFlux)

    def shift_of(self, setting: float | None) -> float | None:
        value = self.default if setting is None else setting
        if value is None:
            return None
        return math.exp(value) if self.exponential else float(value)


DISCRETE = Sampling("ModelSamplingDiscrete", "EPS", None, False)
DISCRETE_FLOW = Sampling("ModelSamplingDiscreteFlow", "FLOW", 1.0, False)
FLUX = Sampling("ModelSamplingFlux", "FLUX", 1.15, True)


@dataclass(frozen=True)
class Setting:
    """One runtime's value of a fact and where it is read (file and key)."""

    runtime: str  # ComfyUI, diffusers, Wan, the model card
    value: float
    source: str


@dataclass(frozen=True)
class ModelRecord:
    """Everything dmsteps knows of one model (see the module docstring)."""

    name: str
    title: str
    schedule: str  # schedules.PRESETS name
    table_stem: str  # the model's own tables: {table_stem}-euler, {table_stem}-{solver}-o{order}
    sampler: str  # solvers.SOLVERS name or alias
    order: int
    sampler_source: str
    comfyui_class: str | None = None  # class of comfy/supported_models.py that loads it
    comfyui_sampling: Sampling | None = None
    comfyui_setting: float | None = None  # sampling_settings["shift"] as the class holds it (None: absent)
    comfyui_patch: tuple[int, int] | None = None  # ModelSamplingFlux node's width, height (FLUX.1-dev)
    shifts: tuple[Setting, ...] = ()  # each runtime's shift s (grid convention), with its source
    shift_from: str | None = None  # the runtime whose shift the record's tables assume
    steps: tuple[Setting, ...] = ()  # the runtimes' default step counts
    published: tuple[str, ...] = ()  # baselines.NAMED_SCHEDULES made for this model
    distilled: str | None = None  # steps fixed by training: what to run instead
    expert_switch: Setting | None = None  # sigma where a two-expert model switches experts
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def shift(self) -> float | None:
        """The shift s the record's tables assume (None: not a flow model)."""
        for setting in self.shifts:
            if setting.runtime == self.shift_from:
                return setting.value
        return None


def _comfy_shift(cls: str, sampling: Sampling, setting: float | None, key_note: str = "") -> Setting:
    value = sampling.shift_of(setting)
    where = (f"{COMFYUI} {cls}.sampling_settings['shift'] = {setting:g}" if setting is not None
             else f"{COMFYUI} {cls}.sampling_settings has no shift: {sampling.name}'s default {sampling.default:g}")
    if sampling.exponential:
        where += f" (mu: s = e^mu = {value:.6g})"
    return Setting("ComfyUI", value, where + key_note)


def _flux_dev(width: int) -> ModelRecord:
    mu = flux_mu(width, width)
    name = f"flux1-dev-{width}"
    return ModelRecord(
        name, f"FLUX.1-dev at {width}x{width}", "flow", name, "euler", 1,
        "diffusers FluxPipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
        comfyui_class="Flux", comfyui_sampling=FLUX, comfyui_setting=None, comfyui_patch=(width, width),
        shifts=(Setting("ComfyUI", math.exp(mu), f"{COMFYUI_NODES} ModelSamplingFlux.patch(max_shift 1.15, base_shift "
                        f"0.5, width = height = {width}): mu = {mu:.6g}, s = e^mu"),
                Setting("diffusers", math.exp(mu), "diffusers pipelines/flux/pipeline_flux.py calculate_shift "
                        f"(defaults 256, 4096, 0.5, 1.15) at {width * width // FLUX_PIXELS_PER_TOKEN} tokens; "
                        "FlowMatchEulerDiscreteScheduler time_shift_type exponential")),
        shift_from="ComfyUI",
        steps=(Setting("diffusers", 28, "diffusers FluxPipeline.__call__ num_inference_steps"),
               Setting("ComfyUI", 20, KSAMPLER_DEFAULTS)),
        published=("optimalsteps-flux",))


def _wan_unipc(title: str) -> str:
    return (f"{title}: diffusers WanPipeline's example uses UniPCMultistepScheduler (pipelines/wan/pipeline_wan.py "
            "EXAMPLE_DOC_STRING); Wan's own code samples with FlowUniPCMultistepScheduler, solver order 2")


_WAN_STEPS = (Setting("diffusers", 50, "diffusers WanPipeline.__call__ num_inference_steps"),)
_WAN21_DIFFUSERS = "diffusers pipelines/wan/pipeline_wan.py EXAMPLE_DOC_STRING: flow_shift = 5.0 (720P), 3.0 (480P)"
_WAN22_CONFIG = "Wan-Video/Wan2.2 wan/configs/wan_{}_A14B.py"


def _records() -> list[ModelRecord]:
    sd_sampler = "ComfyUI: " + KSAMPLER_DEFAULTS
    records = [
        ModelRecord("sd15", "Stable Diffusion 1.5", "scaled_linear", "sd", "euler", 1, sd_sampler,
                    comfyui_class="SD15", comfyui_sampling=DISCRETE,
                    steps=(Setting("diffusers", 50, "diffusers StableDiffusionPipeline.__call__ num_inference_steps"),
                           Setting("ComfyUI", 20, KSAMPLER_DEFAULTS)),
                    published=("ays-sd15", "gits-sd15")),
        ModelRecord("sd21", "Stable Diffusion 2.1 (512 epsilon, 768 v-prediction)", "scaled_linear", "sd", "euler", 1,
                    sd_sampler, comfyui_class="SD20", comfyui_sampling=DISCRETE,
                    steps=(Setting("diffusers", 50, "diffusers StableDiffusionPipeline.__call__ num_inference_steps"),
                           Setting("ComfyUI", 20, KSAMPLER_DEFAULTS))),
        ModelRecord("sdxl", "Stable Diffusion XL 1.0 (base and refiner)", "scaled_linear", "sd", "euler", 1,
                    sd_sampler, comfyui_class="SDXL", comfyui_sampling=DISCRETE,
                    steps=(Setting("diffusers", 50, "diffusers StableDiffusionXLPipeline.__call__ num_inference_steps"),
                           Setting("ComfyUI", 20, KSAMPLER_DEFAULTS)),
                    published=("ays-sdxl",)),
        ModelRecord("sdxl-turbo", "SDXL Turbo / SD Turbo (adversarial distillation)", "scaled_linear", "sd-turbo",
                    "euler", 1, sd_sampler, comfyui_class="SDXL", comfyui_sampling=DISCRETE,
                    distilled="its steps are fixed by training (1 to 4): use ComfyUI's SDTurboScheduler node "
                              "(comfy_extras/nodes_custom_sampler.py: timesteps 999, 899, ... from the top) or the "
                              "model card's 1 to 4 steps, not a table"),
        ModelRecord("sdxl-lightning", "SDXL-Lightning (progressive adversarial distillation, 2/4/8 steps)",
                    "scaled_linear", "sdxl-lightning", "euler", 1, sd_sampler, comfyui_class="SDXL",
                    comfyui_sampling=DISCRETE,
                    distilled="its steps are fixed by training (the 2-, 4- or 8-step checkpoint): run Euler with "
                              "the model card's trailing timesteps (ComfyUI: sgm_uniform) at the checkpoint's step "
                              "count, not a table"),
        ModelRecord("lcm", "Latent Consistency Models (LCM, LCM-LoRA for SD 1.5 and SDXL)", "scaled_linear", "lcm",
                    "euler", 1, sd_sampler, comfyui_class="SD15", comfyui_sampling=DISCRETE,
                    distilled="its steps are fixed by training (2 to 8): sample with ComfyUI's lcm sampler on a "
                              "ModelSamplingDiscrete 'lcm' patched model (comfy_extras/nodes_model_advanced.py) or "
                              "diffusers' LCMScheduler; dmsteps refuses LCM models"),
        ModelRecord("sd3", "Stable Diffusion 3 / 3.5", "flow", "sd3", "euler", 1,
                    "diffusers StableDiffusion3Pipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: "
                    + KSAMPLER_DEFAULTS,
                    comfyui_class="SD3", comfyui_sampling=DISCRETE_FLOW, comfyui_setting=3.0,
                    shifts=(_comfy_shift("SD3", DISCRETE_FLOW, 3.0),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 28, "diffusers StableDiffusion3Pipeline.__call__ num_inference_steps"),
                           Setting("ComfyUI", 20, KSAMPLER_DEFAULTS))),
        *[_flux_dev(w) for w in (512, 768, 1024, 1440)],
        ModelRecord("flux1-schnell", "FLUX.1-schnell (timestep-distilled)", "flow", "flux1-schnell", "euler", 1,
                    "ComfyUI: " + KSAMPLER_DEFAULTS + "; diffusers FluxPipeline: FlowMatchEulerDiscreteScheduler",
                    comfyui_class="FluxSchnell", comfyui_sampling=DISCRETE_FLOW, comfyui_setting=1.0,
                    shifts=(_comfy_shift("FluxSchnell", DISCRETE_FLOW, 1.0),), shift_from="ComfyUI",
                    distilled="its steps are fixed by training (1 to 4, the model card's 4): run its own list, the "
                              "uniform shift-1 sigmas (ComfyUI's simple scheduler; diffusers' default "
                              "np.linspace(1, 1/N, N)), not a table"),
        ModelRecord("chroma", "Chroma (FLUX.1-schnell derivative)", "flow", "chroma", "euler", 1,
                    "diffusers ChromaPipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="Chroma", comfyui_sampling=FLUX, comfyui_setting=None,
                    shifts=(_comfy_shift("Chroma", FLUX, None),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 35, "diffusers ChromaPipeline.__call__ num_inference_steps"),
                           Setting("ComfyUI", 20, KSAMPLER_DEFAULTS)),
                    published=("optimalsteps-chroma",)),
        ModelRecord("wan21", "Wan 2.1 (T2V and I2V, 1.3B and 14B) as ComfyUI loads it", "flow", "wan21-shift8",
                    "unipc", 2, _wan_unipc("Wan 2.1"), comfyui_class="WAN21_T2V", comfyui_sampling=DISCRETE_FLOW,
                    comfyui_setting=8.0,
                    shifts=(_comfy_shift("WAN21_T2V", DISCRETE_FLOW, 8.0),
                            Setting("diffusers", 5.0, _WAN21_DIFFUSERS + " (720P; 480P: record wan21-480p)")),
                    shift_from="ComfyUI", steps=_WAN_STEPS, published=("optimalsteps-wan",)),
        ModelRecord("wan21-480p", "Wan 2.1 at 480P in diffusers", "flow", "wan21-shift3", "unipc", 2,
                    _wan_unipc("Wan 2.1"), shifts=(Setting("diffusers", 3.0, _WAN21_DIFFUSERS),),
                    shift_from="diffusers", steps=_WAN_STEPS, published=("optimalsteps-wan",)),
        ModelRecord("wan21-720p", "Wan 2.1 at 720P in diffusers", "flow", "wan21-shift5", "unipc", 2,
                    _wan_unipc("Wan 2.1"), shifts=(Setting("diffusers", 5.0, _WAN21_DIFFUSERS),),
                    shift_from="diffusers", steps=_WAN_STEPS, published=("optimalsteps-wan",)),
        ModelRecord("wan22", "Wan 2.2 A14B text-to-video (two experts) as ComfyUI loads it", "flow", "wan21-shift8",
                    "unipc", 2, _wan_unipc("Wan 2.2"), comfyui_class="WAN21_T2V", comfyui_sampling=DISCRETE_FLOW,
                    comfyui_setting=8.0,
                    shifts=(_comfy_shift("WAN21_T2V", DISCRETE_FLOW, 8.0,
                                         " (the A14B experts load as Wan 2.1; WAN22_T2V is the 5B model)"),
                            Setting("Wan", 12.0, _WAN22_CONFIG.format("t2v") + " t2v_A14B.sample_shift")),
                    shift_from="ComfyUI",
                    steps=(Setting("Wan", 40, _WAN22_CONFIG.format("t2v") + " t2v_A14B.sample_steps"),
                           *_WAN_STEPS),
                    expert_switch=Setting("Wan", 0.875, _WAN22_CONFIG.format("t2v") + " t2v_A14B.boundary "
                                          "(a fraction of the 1000 training timesteps: sigma = t)"),
                    notes=("Split the table at the expert switch: dmsteps show --split-at-sigma 0.875",)),
        ModelRecord("wan22-i2v", "Wan 2.2 A14B image-to-video (two experts) as ComfyUI loads it", "flow",
                    "wan21-shift8", "unipc", 2, _wan_unipc("Wan 2.2"), comfyui_class="WAN21_I2V",
                    comfyui_sampling=DISCRETE_FLOW, comfyui_setting=8.0,
                    shifts=(_comfy_shift("WAN21_I2V", DISCRETE_FLOW, 8.0, " (the A14B experts load as Wan 2.1)"),
                            Setting("Wan", 5.0, _WAN22_CONFIG.format("i2v") + " i2v_A14B.sample_shift")),
                    shift_from="ComfyUI",
                    steps=(Setting("Wan", 40, _WAN22_CONFIG.format("i2v") + " i2v_A14B.sample_steps"),
                           Setting("diffusers", 50, "diffusers WanImageToVideoPipeline.__call__ num_inference_steps")),
                    expert_switch=Setting("Wan", 0.9, _WAN22_CONFIG.format("i2v") + " i2v_A14B.boundary "
                                          "(a fraction of the 1000 training timesteps: sigma = t)"),
                    notes=("Split the table at the expert switch: dmsteps show --split-at-sigma 0.9",)),
        ModelRecord("hunyuan-video", "HunyuanVideo", "flow", "hunyuan-video", "euler", 1,
                    "diffusers HunyuanVideoPipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="HunyuanVideo", comfyui_sampling=DISCRETE_FLOW, comfyui_setting=7.0,
                    shifts=(_comfy_shift("HunyuanVideo", DISCRETE_FLOW, 7.0),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 50, "diffusers HunyuanVideoPipeline.__call__ num_inference_steps"),)),
        ModelRecord("ltxv", "LTX-Video", "flow", "ltxv", "euler", 1,
                    "diffusers LTXPipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="LTXV", comfyui_sampling=FLUX, comfyui_setting=2.37,
                    shifts=(_comfy_shift("LTXV", FLUX, 2.37),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 50, "diffusers LTXPipeline.__call__ num_inference_steps"),),
                    notes=("ComfyUI's LTX workflows usually sample with its LTXVScheduler node "
                           "(comfy_extras/nodes_lt.py), which computes its own shift from the latent size.",)),
        ModelRecord("qwen-image", "Qwen-Image", "flow", "qwen-image", "euler", 1,
                    "diffusers QwenImagePipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="QwenImage", comfyui_sampling=FLUX, comfyui_setting=1.15,
                    shifts=(_comfy_shift("QwenImage", FLUX, 1.15),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 50, "diffusers QwenImagePipeline.__call__ num_inference_steps"),),
                    notes=("Its published ComfyUI workflows often patch another shift with ModelSamplingAuraFlow; "
                           "optimize --shift S makes steps for that one.",)),
        ModelRecord("lumina2", "Lumina-Image 2.0", "flow", "lumina2", "euler", 1,
                    "diffusers Lumina2Pipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="Lumina2", comfyui_sampling=DISCRETE_FLOW, comfyui_setting=6.0,
                    shifts=(_comfy_shift("Lumina2", DISCRETE_FLOW, 6.0),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 30, "diffusers Lumina2Pipeline.__call__ num_inference_steps"),)),
        ModelRecord("mochi", "Mochi 1", "flow", "mochi", "euler", 1,
                    "diffusers MochiPipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="GenmoMochi", comfyui_sampling=DISCRETE_FLOW, comfyui_setting=6.0,
                    shifts=(_comfy_shift("GenmoMochi", DISCRETE_FLOW, 6.0),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 64, "diffusers MochiPipeline.__call__ num_inference_steps"),),
                    published=("linear_quadratic",)),
        ModelRecord("auraflow", "AuraFlow", "flow", "auraflow", "euler", 1,
                    "diffusers AuraFlowPipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="AuraFlow", comfyui_sampling=DISCRETE_FLOW, comfyui_setting=1.73,
                    shifts=(_comfy_shift("AuraFlow", DISCRETE_FLOW, 1.73),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 50, "diffusers AuraFlowPipeline.__call__ num_inference_steps"),)),
        ModelRecord("hunyuan-image-2.1", "HunyuanImage 2.1", "flow", "hunyuan-image-2.1", "euler", 1,
                    "diffusers HunyuanImagePipeline: FlowMatchEulerDiscreteScheduler; ComfyUI: " + KSAMPLER_DEFAULTS,
                    comfyui_class="HunyuanImage21", comfyui_sampling=DISCRETE_FLOW, comfyui_setting=5.0,
                    shifts=(_comfy_shift("HunyuanImage21", DISCRETE_FLOW, 5.0),), shift_from="ComfyUI",
                    steps=(Setting("diffusers", 50, "diffusers HunyuanImagePipeline.__call__ num_inference_steps"),)),
    ]
    return records


MODELS: dict[str, ModelRecord] = {record.name: record for record in _records()}
ALIASES = {"flux1-dev": "flux1-dev-1024", "flux": "flux1-dev-1024", "wan": "wan21", "sd3.5": "sd3",
           "qwen": "qwen-image", "hunyuanvideo": "hunyuan-video"}


def model_record(name: str) -> ModelRecord:
    """The record of model ``name`` (or an alias); BadInput naming the closest names otherwise."""
    key = ALIASES.get(name, name)
    if key in MODELS:
        return MODELS[key]
    import difflib

    close = difflib.get_close_matches(name, [*MODELS, *ALIASES], n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise BadInput(f"unknown model {name!r}: {hint}dmsteps tables --model all lists them")


# --- finding a model's table ---------------------------------------------------------------------

def table_suffix(solver: str, order: int) -> str:
    """The part of a table name after the model or family: ``euler`` for first-order tables of the
    Euler solver, ``{solver}-o{order}`` otherwise."""
    from .solvers import solver_spec

    spec = solver_spec(solver)
    return "euler" if spec.orders == (1,) else f"{spec.name}-o{order}"


def model_table_name(record: ModelRecord, solver: str | None = None, order: int | None = None) -> str:
    """The name of the model's own table for ``solver``/``order`` (default: the model's sampler)."""
    return f"{record.table_stem}-{table_suffix(solver or record.sampler, order or record.order)}"


@dataclass(frozen=True)
class TableChoice:
    """The table ``tables_for`` picked: its name, whether it is the model's own, and what differs."""

    name: str | None
    own: bool
    note: str


def _shift_distance(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    return abs(math.log(a / b))


def tables_for(record: ModelRecord, index: dict | None = None, solver: str | None = None,
               order: int | None = None) -> TableChoice:
    """The ready-made table for ``record`` (and ``solver``/``order``, default the model's sampler)
    among the rows of ``index`` (default: the bundled tables' index): the model's own table where it
    exists; else the family table of the same schedule at the nearest shift (log distance), the
    same solver and order where there is one, else the one whose solver runs the model's order the
    closest; the note says which model-specific table is not built yet and what differs."""
    from .solvers import own_solver, solver_spec
    from .tables import bundled_index

    rows = (index or bundled_index())["files"]
    order = order or record.order
    spec = solver_spec(own_solver(solver_spec(solver or record.sampler).name, order))  # DPM-Solver++ 1: DDIM's
    own = model_table_name(record, spec.name, order)
    names = {row["file"].removesuffix(".json"): row for row in rows}
    if own in names:
        return TableChoice(own, True, "")
    fitting = [row for row in rows if row["schedule"] == record.schedule]
    if not fitting:
        return TableChoice(None, False, f"no ready-made table for the {record.schedule} schedule; dmsteps optimize "
                                        "makes one")
    nearest = min(_shift_distance(row["shift"], record.shift) for row in fitting)
    fitting = [row for row in fitting if _shift_distance(row["shift"], record.shift) <= nearest + SHIFT_RTOL]
    fitting.sort(key=lambda row: (row["solver"] != spec.name, abs(row["order"] - order), row["order"],
                                  row["solver"]))
    row = fitting[0]
    name = row["file"].removesuffix(".json")
    differs = []
    if record.shift is not None and row["shift"] is not None and nearest > SHIFT_RTOL:
        differs.append(f"placed for shift {row['shift']:g}, the model samples at shift {record.shift:.4g}")
    if row["solver"] != spec.name or row["order"] != order:
        differs.append(f"made for {row['solver']} order {row['order']}, not {solver or record.sampler} order {order}")
    note = f"the model's own table {own} is not built yet; the family table {name} applies"
    return TableChoice(name, False, note + (f" ({'; '.join(differs)})" if differs else ""))


# --- a model's settings for optimize, and distilled models ---------------------------------------

def refuse_distilled(record: ModelRecord) -> None:
    """BadInput for a model whose steps were fixed by training: say so and name its own list."""
    if record.distilled:
        raise BadInput(f"{record.name} ({record.title}): {record.distilled}")


def model_settings(name: str) -> dict:
    """What ``optimize --model NAME`` makes steps for: the schedule preset, the flow shift (None for
    other schedules), the solver and order the model's runtime samples with. BadInput for an unknown
    model and for a distilled one (``refuse_distilled``)."""
    record = model_record(name)
    refuse_distilled(record)
    return {"schedule": record.schedule, "shift": record.shift, "solver": record.sampler, "order": record.order}


def distilled_comfyui_model(class_name: str) -> ModelRecord | None:
    """The distilled model ComfyUI loads as ``class_name`` (comfy/supported_models.py), where no
    other model loads as that class (FluxSchnell: FLUX.1-schnell); None otherwise."""
    records = [r for r in MODELS.values() if r.comfyui_class == class_name]
    return records[0] if len(records) == 1 and records[0].distilled else None
