"""Checkpoints: loading a diffusers folder or a Gaussian-mixture file, and the denoiser it gives.

``load_checkpoint`` reads a diffusers pipeline folder (``unet/`` or ``transformer/`` beside
``scheduler/``), a bare ``UNet2DModel`` folder, a text-to-image pipeline (detected only: it runs
through the pipeline's own call) or a Gaussian-mixture ``.yaml``/``.npz`` file, together with its
noise schedule (from its scheduler config, or given) and prediction type. ``Checkpoint.denoiser``
wraps the model as a data-prediction denoiser ``d(x, t, timestep, alpha, sigma) -> x0_hat`` (see
``runtime``): states (B, C, H, W) in any dtype and device; the network runs in the checkpoint's
dtype on its device.

Class-conditional models (a UNet2DModel with ``num_class_embeds``, a DiT) take one class label per
sample. Classifier-free guidance with scale g evaluates each sample with its label (cond) and with
the model's *null class* (uncond) and uses uncond + g (cond - uncond). The null class is the DiT's
``num_embeds_ada_norm`` (its family defines one); a UNet's is the ``null_class`` of
``class_conditioning.json`` beside its ``config.json`` (``CONDITIONING_FILE``: written by
``studies/train_digits.py --class-conditional``, ``{"null_class": 10, ...}``), else the one given
(``null_class``: the class its labels were dropped to in training), else guidance is refused.
A text-to-image network (``text_to_image.load_text_to_image``) carries ``prompts``: its labels are
indices of prompts whose embeddings it is called with, and guidance's unconditional half is the
negative prompt's.

May import torch, numpy, the torch-free package modules (errors, schedules), runtime and
mixtures; sample, evaluate and refine import it. diffusers is imported inside the functions that
need it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput, bad_setting, first_line, mentioning
from .files import read_json
from .limits import in_bounds
from .mixtures import GaussianMixture, load_mixture
from .runtime import Denoiser, timestep_tensor, to_data_prediction
from .schedule_sources import (
    ScheduleSource,
    check_prediction_type,
    find_scheduler_config,
    read_schedule,
    read_scheduler_config,
)
from .schedules import PRESETS, Schedule, same_schedule

SUPPORTED_MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel")
CONDITIONING_FILE = "class_conditioning.json"  # beside a UNet's config.json: {"null_class": K, ...}


def check_class_labels(source: str, num_classes: int | None, class_labels) -> torch.Tensor | None:
    """The class labels for checkpoint ``source`` as a (n,) int64 CPU tensor, or None for a model
    that is not class-conditional (``num_classes`` None). ``class_labels``: None, an int or n ints;
    they are needed exactly when the model is class-conditional and lie in 0..num_classes - 1 (the
    rows of its class embedding; a UNet's null class is one of them, a DiT's is not)."""
    if num_classes is None:
        if class_labels is not None:
            raise BadInput(f"checkpoint {source} is not class-conditional: it takes no class labels")
        return None
    if class_labels is None:
        raise mentioning("class_label", f"checkpoint {source} is class-conditional: give {{setting}} "
                                        f"in 0..{num_classes - 1}")
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise BadInput("class labels must be integers")
    if labels.numel() == 0:
        raise BadInput("class labels: give at least one")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        raise BadInput(f"class label {int(outside[0])} is out of range: checkpoint {source} has classes "
                       f"0..{num_classes - 1}")
    return labels.to(torch.long)


def pair_labels(class_labels, n: int) -> list[int] | None:
    """The class label of each of ``n`` noises, paired round robin: noise i (the i-th seed of its
    set) has class_labels[i % len(class_labels)]. None for None (an unconditional model)."""
    if class_labels is None:
        return None
    labels = [int(k) for k in class_labels]
    return [labels[i % len(labels)] for i in range(n)]


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale (cond - uncond): the guided output from the conditional and the unconditional
    (null-class) outputs of one network, in the network's output space (epsilon, v, x0 or velocity:
    the conversion to x0 is affine, so guiding either gives the same x0)."""
    return uncond + scale * (cond - uncond)


@dataclass
class Checkpoint:
    """A loaded model with what a sampler needs to drive it.

    ``kind``: "unet", "transformer", "gmm" or "pipeline" (a text-to-image pipeline, which runs
    through the pipeline's own call and has no ``denoiser`` here); ``sample_shape``: (C, H, W) of
    the space the sampler works in (latents for latent models; None where unknown); ``source``:
    where it was loaded from, for messages.
    """

    kind: str
    schedule: Schedule
    prediction_type: str
    sample_shape: tuple | None
    num_classes: int | None
    source: str
    model: Any = field(default=None, repr=False)
    device: Any = "cpu"
    dtype: Any = torch.float32
    note: str = ""
    model_class: str = ""
    null_class: int | None = None  # guidance's unconditional class: DiT's num_classes; a UNet's recorded or given
    prompts: Any = field(default=None, repr=False)  # a text_to_image.PromptSet: labels index its prompts
    latent: bool = False  # the denoiser works on a VAE's latents (errors are measured there)

    def denoiser(self, class_labels=None, guidance_scale: float = 1.0) -> Denoiser:
        """``d(x, t, timestep, alpha, sigma) -> x0_hat`` for this checkpoint.

        ``class_labels``: an int or B ints for class-conditional models (one for the whole batch,
        or one per row of the batch of B states it is called on), or prompt indices for a
        text-to-image network; ``guidance_scale`` != 1 applies classifier-free guidance
        (``classifier_free_guidance``) with ``null_class`` (or the negative prompt), evaluating the
        conditional and unconditional halves in one doubled batch.
        """
        if self.kind == "pipeline":
            raise BadInput(f"{self.source} is a text-to-image pipeline: it runs through the pipeline's own "
                           "call, not through a bare denoiser")
        if self.prompts is not None:
            labels = self.prompts.check(class_labels)
        else:
            labels = check_class_labels(self.source, self.num_classes, class_labels)
        g = float(guidance_scale)
        if self.kind == "gmm":
            if g != 1.0:
                raise BadInput("a Gaussian mixture takes no class labels and no guidance")
            mixture = self.model

            def gmm_denoiser(x, t, timestep, alpha, sigma):
                return mixture.denoise(x, alpha, sigma)

            return gmm_denoiser
        return self._network_denoiser(labels, g)

    def _network_denoiser(self, labels: torch.Tensor | None, g: float) -> Denoiser:
        guided = g != 1.0
        text = self.prompts
        if guided and text is None and self.num_classes is None:
            raise BadInput(f"{self.source}: classifier-free guidance needs a class-conditional model; "
                           "use guidance_scale 1")
        if guided and text is None and self.null_class is None:
            raise mentioning("null_class", f"checkpoint {self.source} names no null class for classifier-free "
                                           "guidance: give {setting} (the class its labels were dropped to in "
                                           "training), or leave the guidance scale at 1")
        model, device, dtype = self.model, torch.device(self.device), self.dtype
        if labels is not None:
            labels = labels.to(device)
        channels = self.sample_shape[0] if self.sample_shape else None
        ptype, null = self.prediction_type, self.null_class
        keywords = self.model_class == "SD3Transformer2DModel"  # its second positional input is not the timestep

        def model_denoiser(x, t, timestep, alpha, sigma):
            B = x.shape[0]
            xin = x.to(device=device, dtype=dtype)
            lab = None
            if labels is not None:
                if labels.numel() == 1:
                    lab = labels.expand(B)
                elif labels.numel() == B:
                    lab = labels
                else:
                    raise BadInput(f"got {labels.numel()} class labels for a batch of {B}")
            if text is not None:
                kwargs = text.inputs(lab, guided)
            elif lab is not None:
                kwargs = {"class_labels": torch.cat([lab, torch.full_like(lab, null)]) if guided else lab}
            else:
                kwargs = {}
            if guided:
                xin = torch.cat([xin, xin])
            ts = timestep_tensor(timestep, xin.shape[0], device)
            # no autograd graph unless a caller differentiates through the model (refine's gradients)
            needs_grad = any(torch.is_tensor(v) and v.requires_grad for v in (xin, timestep, alpha, sigma))
            with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
                if keywords:
                    out = model(hidden_states=xin, timestep=ts, **kwargs).sample
                else:
                    out = model(xin, ts, **kwargs).sample
            if channels is not None and out.shape[1] != channels:
                out = out[:, :channels]  # learned variance / sigma channels
            out = out.to(device=x.device, dtype=x.dtype)
            if guided:
                out = classifier_free_guidance(out[:B], out[B:], g)
            return to_data_prediction(out, x, alpha, sigma, ptype)

        return model_denoiser


def network_denoiser(ckpt: Checkpoint, class_label=None, guidance_scale: float = 1.0) -> Denoiser:
    """The denoiser a sampler drives: ``ckpt.denoiser(class_label, guidance_scale)`` after checking
    that the checkpoint's sample shape is known."""
    if ckpt.sample_shape is None:
        raise BadInput(f"checkpoint {ckpt.source}: unknown sample shape")
    return ckpt.denoiser(class_labels=class_label, guidance_scale=guidance_scale)


def labelled_denoiser(ckpt: Checkpoint, class_labels, guidance_scale: float = 1.0):
    """``labels -> Denoiser``: the denoiser of a batch whose row i has class ``labels[i]`` (a (B,)
    int tensor or B ints), with classifier-free guidance ``guidance_scale``, for a
    class-conditional checkpoint measured on many classes at once. Every label of
    ``class_labels`` (the ones it will be given) and the guidance are checked here, once."""
    network_denoiser(ckpt, class_labels, guidance_scale)

    def of_labels(labels) -> Denoiser:
        return ckpt.denoiser(class_labels=labels, guidance_scale=guidance_scale)

    return of_labels


def with_null_class(ckpt: Checkpoint, null_class: int | None) -> Checkpoint:
    """``ckpt`` with the null class ``null_class`` for classifier-free guidance (None: as loaded).
    A class-conditional UNet takes any of its classes 0..num_classes - 1; where the checkpoint
    names its null class already (a DiT, a UNet with ``CONDITIONING_FILE``) the one given must be
    the same; a model without classes takes none."""
    if null_class is None:
        return ckpt
    if isinstance(null_class, bool) or not isinstance(null_class, int):
        raise bad_setting("null_class", f"must be a whole number, got {null_class!r}")
    in_bounds("null_class", null_class)
    if ckpt.num_classes is None:
        raise mentioning("null_class", f"checkpoint {ckpt.source} is not class-conditional: drop {{setting}}")
    if ckpt.null_class is not None:
        if null_class != ckpt.null_class:
            where = "num_embeds_ada_norm" if ckpt.kind == "transformer" else CONDITIONING_FILE
            raise mentioning("null_class", f"checkpoint {ckpt.source} names its null class, {ckpt.null_class} "
                                           f"({where}), not {null_class}: drop {{setting}}")
        return ckpt
    if null_class >= ckpt.num_classes:
        raise bad_setting("null_class", f"{null_class} is out of range: checkpoint {ckpt.source} has classes "
                                        f"0..{ckpt.num_classes - 1}")
    return replace(ckpt, null_class=null_class)


def _recorded_null_class(model_dir: Path, num_classes: int | None) -> int | None:
    """The null class that ``model_dir/CONDITIONING_FILE`` records (None without the file)."""
    path = model_dir / CONDITIONING_FILE
    if not path.is_file():
        return None
    value = read_json(path, "class conditioning").get("null_class")
    if num_classes is None:
        raise BadInput(f"{path}: the model is not class-conditional (no num_class_embeds)")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
        raise BadInput(f"{path}: field 'null_class' must be a class of the model, 0..{num_classes - 1}")
    return value


def mixture_checkpoint(mixture: GaussianMixture, schedule: Schedule, source: str = "mixture") -> Checkpoint:
    """A Gaussian mixture as a checkpoint on the mixture's device: its exact denoiser (data
    prediction) under ``schedule``."""
    return Checkpoint("gmm", schedule, "sample", mixture.sample_shape, None, source, model=mixture,
                      device=mixture.device, dtype=mixture.dtype, model_class="GaussianMixture",
                      note="closed-form ideal denoiser E[x_0 | x_t]")


def import_diffusers():
    """The diffusers module; BadInput saying how to install it where it is missing."""
    try:
        import diffusers
    except ImportError:
        raise BadInput("loading a diffusers checkpoint needs diffusers: pip install 'dmsteps[sample]'") from None
    return diffusers


def _schedule_of(schedule, base: Path | None = None) -> ScheduleSource:
    """What a ``schedule`` argument (a Schedule, or a string for ``read_schedule``) names; a
    relative path is looked up under ``base`` first (a mixture file names its schedule so)."""
    if isinstance(schedule, Schedule):
        return ScheduleSource(schedule)
    spec = str(schedule)
    if spec not in PRESETS and base is not None and not Path(spec).is_absolute() and (base / spec).exists():
        spec = str(base / spec)
    return read_schedule(spec)


def load_checkpoint(path, device="cpu", dtype=torch.float32, schedule=None,
                    prediction_type: str | None = None, null_class: int | None = None) -> Checkpoint:
    """Load a diffusers pipeline folder, a bare UNet2DModel folder or a Gaussian-mixture file.

    ``schedule`` (a Schedule, a preset name or a scheduler config path) is needed where the
    checkpoint names none (a bare UNet folder); where it names one, ``schedule`` must be the same
    schedule (same identity). For a mixture file it replaces the file's schedule (the ideal
    denoiser is exact for any schedule). ``prediction_type`` overrides the scheduler config's.
    ``null_class``: the null class of a class-conditional UNet for guidance (``with_null_class``;
    a DiT's is its ``num_embeds_ada_norm``, a UNet's may be recorded in ``CONDITIONING_FILE``).
    Every problem is a ``BadInput`` with one line.

    A folder is read in steps, each its own function: its layout (``folder_layout``), its schedule
    (``checkpoint_schedule``), then a text-to-image pipeline is only described
    (``pipeline_checkpoint``) and a network's config checked (``model_config``) before its weights
    load (``load_weights``).
    """
    if null_class is not None:
        in_bounds("null_class", null_class)
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise BadInput(f"checkpoint {source} does not exist")
    if p.is_file():
        if p.suffix.lower() in (".yaml", ".yml", ".npz"):
            return with_null_class(_load_gmm(p, device, schedule, prediction_type), null_class)
        raise BadInput(f"checkpoint {source}: expected a diffusers folder or a Gaussian-mixture .yaml/.npz file")

    layout = folder_layout(p)
    read = checkpoint_schedule(p, schedule, layout.text)
    sched = read.schedule
    ptype = check_prediction_type(prediction_type or read.prediction_type or "epsilon", sched, source)
    if layout.text:
        return with_null_class(pipeline_checkpoint(layout, sched, ptype, source, device, dtype), null_class)
    model = model_config(layout.model_dir, source)
    network = load_weights(model, source, device, dtype)
    latent = model.kind == "transformer" and ((p / "vae").is_dir() or bool(layout.index and "vae" in layout.index))
    note = "latent model: the denoiser works on latents; decode them with the pipeline's vae" if latent else ""
    return with_null_class(Checkpoint(model.kind, sched, ptype, model.shape, model.num_classes, source, model=network,
                                      device=device, dtype=dtype, note=note, latent=latent,
                                      model_class=model.class_name, null_class=model.null_class),
                           null_class)


@dataclass(frozen=True)
class FolderLayout:
    """What a diffusers folder holds: ``index`` (its model_index.json, or None), ``text`` (a
    text-to-image pipeline: a text encoder beside the network) and ``model_dir`` (the network's
    folder: unet/, transformer/ or the folder itself; None for a pipeline without either)."""

    index: dict | None
    text: bool
    model_dir: Path | None


def folder_layout(p: Path) -> FolderLayout:
    """The layout of the diffusers folder ``p``: a pipeline (unet/ or transformer/ beside
    scheduler/), a text-to-image pipeline or a bare model (config.json); BadInput for none."""
    index = read_json(p / "model_index.json", "pipeline index") if (p / "model_index.json").is_file() else None
    text = (p / "text_encoder").is_dir() or bool(index and isinstance(index.get("text_encoder"), list)
                                                  and index["text_encoder"][0] is not None)
    if (p / "unet").is_dir():
        model_dir = p / "unet"
    elif (p / "transformer").is_dir():
        model_dir = p / "transformer"
    elif (p / "config.json").is_file() and not text:
        model_dir = p
    elif text:
        model_dir = None
    else:
        raise BadInput(f"checkpoint {p}: no unet/, transformer/ or config.json (not a diffusers model folder)")
    return FolderLayout(index, text, model_dir)


def checkpoint_schedule(p: Path, schedule, text: bool) -> ScheduleSource:
    """The schedule of the folder ``p``: its scheduler config's (``find_scheduler_config``), which a
    ``schedule`` given must equal; the one given where the folder has none (or, for a text-to-image
    pipeline, one dmsteps cannot read). EDM and score-SDE VE schedulers are refused for networks
    (dmsteps does not apply their preconditioning)."""
    source = str(p)
    cfg_path = find_scheduler_config(p)
    if cfg_path is None:
        if schedule is None:
            raise mentioning("schedule", f"checkpoint {source} has no scheduler config: give its noise schedule "
                                         "({setting}: a preset or a scheduler_config.json)")
        return _schedule_of(schedule)
    cfg = read_json(cfg_path, "scheduler config")
    cls = str(cfg.get("_class_name", ""))
    if not text and cls.startswith(("EDM", "ScoreSdeVe")):
        raise BadInput(f"scheduler config {cfg_path}: {cls} models need the scheduler's input/output "
                       "preconditioning, which dmsteps does not apply")
    try:
        own = read_scheduler_config(cfg, f"scheduler config {cfg_path}", str(cfg_path))
    except BadInput:
        if not (text and schedule is not None):
            raise
        own = None
    if schedule is None:
        return own
    given = _schedule_of(schedule)
    if own is not None and not same_schedule(given.schedule.identity(), own.schedule.identity()):
        raise BadInput(f"checkpoint {source}: the schedule given ({given.schedule.name}) differs from the "
                       f"checkpoint's scheduler config {cfg_path}")
    return given if own is None else own


def pipeline_checkpoint(layout: FolderLayout, sched: Schedule, ptype: str, source: str, device, dtype) -> Checkpoint:
    """A text-to-image pipeline, detected only (it runs through the pipeline's own call): its
    schedule, prediction type, and the network's class and sample shape where its config says."""
    shape, cls_name = None, ""
    if layout.model_dir is not None and (layout.model_dir / "config.json").is_file():
        mcfg = read_json(layout.model_dir / "config.json", "model config")
        cls_name = str(mcfg.get("_class_name", ""))
        if isinstance(mcfg.get("in_channels"), int) and isinstance(mcfg.get("sample_size"), int):
            shape = (mcfg["in_channels"], mcfg["sample_size"], mcfg["sample_size"])
    return Checkpoint("pipeline", sched, ptype, shape, None, source, device=device, dtype=dtype, model_class=cls_name,
                      note="text-to-image pipeline: sample it through the pipeline's own call (dmsteps sample), not "
                           "through a bare denoiser")


@dataclass(frozen=True)
class ModelConfig:
    """A network's config.json, checked: ``kind`` ("unet" or "transformer"), ``class_name`` (one of
    ``SUPPORTED_MODEL_CLASSES``), ``shape`` ((C, H, W) or None where unknown), ``num_classes``
    (None: not class-conditional), ``null_class`` (the one it names: a DiT's, or a UNet's
    ``CONDITIONING_FILE``), ``folder`` (where config and weights lie)."""

    kind: str
    class_name: str
    shape: tuple | None
    num_classes: int | None
    null_class: int | None
    folder: Path


def model_config(model_dir: Path, source: str) -> ModelConfig:
    """The checked config of the network in ``model_dir``; BadInput for a missing config, an
    unsupported class or option, or missing weights."""
    mcfg_path = model_dir / "config.json"
    if not mcfg_path.is_file():
        raise BadInput(f"checkpoint {source}: {mcfg_path} is missing")
    mcfg = read_json(mcfg_path, "model config")
    cls_name = str(mcfg.get("_class_name", ""))
    if cls_name == "Transformer2DModel" and mcfg.get("norm_type") == "ada_norm_zero" and mcfg.get("patch_size"):
        cls_name = "DiTTransformer2DModel"  # DiT checkpoints saved before the class existed
    if cls_name not in SUPPORTED_MODEL_CLASSES:
        raise BadInput(f"model config {mcfg_path}: unsupported model class {cls_name or '(no _class_name)'!r} "
                       f"(supported: {', '.join(SUPPORTED_MODEL_CLASSES)})")
    if not any(model_dir.glob("diffusion_pytorch_model*")):
        raise BadInput(f"checkpoint {source}: no weights (diffusion_pytorch_model.safetensors or .bin) in {model_dir}")

    def _int(key, default=None):
        value = mcfg.get(key, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadInput(f"model config {mcfg_path}: field '{key}' must be a positive integer")
        return value

    if cls_name == "UNet2DModel":
        if mcfg.get("time_embedding_type", "positional") != "positional":
            raise BadInput(f"model config {mcfg_path}: time_embedding_type "
                           f"{mcfg.get('time_embedding_type')!r} (score-SDE VE models) is not supported")
        if mcfg.get("class_embed_type") is not None:
            raise BadInput(f"model config {mcfg_path}: class_embed_type {mcfg['class_embed_type']!r} "
                           "is not supported")
        num_classes = _int("num_class_embeds")
        own_null = _recorded_null_class(model_dir, num_classes)
        size = mcfg.get("sample_size")
        if isinstance(size, (list, tuple)) and len(size) == 2:
            hw = (int(size[0]), int(size[1]))
        elif size is None:
            hw = None
        else:
            s = _int("sample_size")
            hw = (s, s)
        shape = (_int("in_channels", 3), *hw) if hw else None
        kind = "unet"
    else:
        num_classes = _int("num_embeds_ada_norm", 1000)
        own_null = num_classes
        size = _int("sample_size", 32)
        shape = (_int("in_channels", 4), size, size)
        kind = "transformer"

    out_channels = (mcfg.get("out_channels") or shape[0]) if shape else None
    if shape and out_channels not in (shape[0], 2 * shape[0]):
        raise BadInput(f"model config {mcfg_path}: out_channels {out_channels} is neither in_channels "
                       f"({shape[0]}) nor twice that (learned variance)")
    return ModelConfig(kind, cls_name, shape, num_classes, own_null, model_dir)


def load_weights(model: ModelConfig, source: str, device, dtype):
    """The network of ``model`` (diffusers' ``from_pretrained``) in ``dtype`` on ``device``, in eval
    mode without gradients for its parameters."""
    diffusers = import_diffusers()
    model_cls = getattr(diffusers, model.class_name)
    try:
        network = model_cls.from_pretrained(str(model.folder), torch_dtype=dtype,
                                            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except Exception as exc:  # corrupt or mismatched weights raise many kinds of errors
        raise BadInput(f"checkpoint {source}: cannot load {model.class_name} from {model.folder} "
                       f"({first_line(exc)})") from None
    try:
        network = network.to(device)
    except Exception as exc:
        raise BadInput(f"checkpoint {source}: cannot move the model to {device} ({first_line(exc)})") from None
    return network.eval().requires_grad_(False)


def _load_gmm(p: Path, device, schedule, prediction_type) -> Checkpoint:
    mixture, spec = load_mixture(p)
    if schedule is not None:
        sched = _schedule_of(schedule).schedule
    elif spec is not None:
        try:
            sched = _schedule_of(spec, base=p.parent).schedule
        except BadInput as exc:
            raise BadInput(f"mixture file {p}: field 'schedule': {exc}") from None
    else:
        raise mentioning("schedule", f"mixture file {p}: field 'schedule' is missing; give the noise schedule "
                                     "with {setting}")
    if prediction_type not in (None, "sample"):
        raise BadInput("a Gaussian mixture is its own exact data prediction: prediction_type must be 'sample'")
    return mixture_checkpoint(mixture.to(device=device), sched, str(p))
