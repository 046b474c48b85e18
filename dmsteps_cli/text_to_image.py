"""Text-to-image pipelines as denoisers: each prompt encoded once, the network conditioned on it.

``load_text_to_image`` loads a diffusers text-to-image pipeline folder (Stable Diffusion 1.x/2.x,
SDXL, SD3: ``SUPPORTED_PIPELINES``), runs its text encoders once per prompt (through the
pipeline's own ``encode_prompt``, so tokenization, clip skip defaults and SDXL's zero negative
embeddings are the pipeline's), keeps the embeddings, drops the text encoders and the VAE, and
returns a ``checkpoints.Checkpoint`` of the denoising network (``UNet2DConditionModel`` or
``SD3Transformer2DModel``) with a ``PromptSet``. Its denoiser works on latents: a latent model is
measured in latent space (errors are RMS over the latent's dimensions).

Prompts take the place of class labels: a "label" of such a checkpoint is the index of a prompt in
``PromptSet.texts``, so ``evaluate`` and ``refine`` pair noises with prompts round robin exactly as
they pair them with classes (noise i of a set has prompt i mod P of that set's P prompts).
``texts`` holds the fitted prompts (``--prompts``) and after them the held-out ones
(``--holdout-prompts``; without them the held-out noises take the fitted prompts).

Guidance with scale g is the pipelines' classifier-free guidance: uncond + g (cond - uncond), with
uncond the network's output for the negative prompt (``--negative-prompt``; default the empty
prompt, which SDXL pipelines whose config sets ``force_zeros_for_empty_prompt`` encode as zeros,
as their own call does).

SDXL's added conditioning (``added_cond_kwargs``): the pooled text embedding of the second encoder
and the six time ids (H, W, 0, 0, H, W) of an uncropped image of the network's default size (H = W
= sample_size x the VAE's scale factor), the same for the negative prompt, as the pipeline's call
builds them by default. SD3: the pooled projections of both CLIP encoders and the joint sequence
of CLIP and T5 embeddings (zeros where the pipeline has no T5 encoder, as its call does).

May import torch, numpy, the torch-free package modules, runtime and checkpoints; evaluate and
refine import it. diffusers is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoints import Checkpoint, import_diffusers, load_checkpoint
from .errors import BadInput, bad_setting, first_line, mentioning
from .files import read_input
from .files import read_json

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")
MAX_PROMPTS = 100_000
ENCODE_BATCH = 16  # prompts per call of the text encoders
PAIRING = "round robin: noise i of a set of noises (seed first + i) has that set's prompt i % (number of prompts)"


def read_prompts(path, setting: str = "prompts") -> list[str]:
    """The prompts of a text file, one per line (``-``: standard input): surrounding white space
    stripped, blank lines and lines starting with ``#`` skipped. At least one, at most
    ``MAX_PROMPTS``."""
    text = read_input(path, f"prompt file (--{setting.replace('_', '-')})")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise bad_setting(setting, f"{path} holds no prompt: write one per line")
    if len(prompts) > MAX_PROMPTS:
        raise bad_setting(setting, f"{path} holds {len(prompts)} prompts; at most {MAX_PROMPTS}")
    return prompts


def _sha256(tensors: dict) -> str:
    """sha256 (hex) of named tensors: name, dtype, shape and bytes, by name in sorted order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class PromptSet:
    """Prompts encoded once, as the denoising network's conditioning inputs.

    ``texts``: the fitted prompts (``texts[:fitted]``), then the held-out ones; ``embeds``: input
    name -> (len(texts), ...) tensor, the conditioning of each prompt on the network's device and
    dtype (names with a dot are nested: ``added_cond_kwargs.time_ids`` is
    ``added_cond_kwargs={"time_ids": ...}``); ``negative``: input name -> (1, ...) tensor, the
    negative prompt's; ``keys``: sha256 of each prompt's embeddings and ``negative_key`` of the
    negative's (what a reference solution depends on: prompt, tokenizer and text encoders).
    """

    texts: list
    fitted: int
    negative_prompt: str
    embeds: dict
    negative: dict
    keys: list
    negative_key: str

    @property
    def held_out(self) -> bool:
        """True when the held-out noises have prompts of their own."""
        return self.fitted < len(self.texts)

    def indices(self, held: bool = False) -> list[int]:
        """The labels (indices into ``texts``) that the noises of a set pair with round robin: the
        fitted prompts', or with ``held`` the held-out prompts' (the fitted ones where there are none)."""
        if held and self.held_out:
            return list(range(self.fitted, len(self.texts)))
        return list(range(self.fitted))

    def check(self, labels) -> torch.Tensor:
        """``labels`` (an int or ints: indices into ``texts``) as a (n,) int64 CPU tensor."""
        if labels is None:
            raise BadInput("a text-to-image checkpoint needs prompts: pair its noises with prompt indices")
        out = torch.as_tensor(labels).reshape(-1)
        if out.is_floating_point() or out.dtype == torch.bool or out.numel() == 0:
            raise BadInput("prompt indices must be whole numbers, at least one")
        if int(out.min()) < 0 or int(out.max()) >= len(self.texts):
            raise BadInput(f"prompt index out of range 0..{len(self.texts) - 1}")
        return out.to(torch.long)

    def inputs(self, labels: torch.Tensor, guided: bool) -> dict:
        """The network's keyword inputs for a batch whose row i has prompt ``labels[i]``; with
        ``guided`` for the doubled batch (the prompts' rows, then as many rows of the negative)."""
        idx = labels.to(next(iter(self.embeds.values())).device)
        kwargs: dict = {}
        for name, table in self.embeds.items():
            rows = table[idx]
            if guided:
                rows = torch.cat([rows, self.negative[name].expand(len(idx), *rows.shape[1:])])
            outer, _, inner = name.partition(".")
            if inner:
                kwargs.setdefault(outer, {})[inner] = rows
            else:
                kwargs[name] = rows
        return kwargs

    def key(self, label: int, guided: bool) -> dict:
        """What a reference solution from a noise paired with prompt ``label`` depends on: the
        prompt and its embeddings' hash, and with guidance the negative prompt and its hash."""
        out = {"prompt": self.texts[label], "prompt_embeddings": self.keys[label]}
        if guided:
            out.update({"negative_prompt": self.negative_prompt, "negative_embeddings": self.negative_key})
        return out

    def record(self, guidance_scale: float) -> dict:
        """The conditioning record of a report or a refined table."""
        return {"prompts": self.texts[:self.fitted],
                "holdout_prompts": self.texts[self.fitted:] if self.held_out else None,
                "pairing": PAIRING, "negative_prompt": self.negative_prompt if guidance_scale != 1.0 else None,
                "guidance_scale": float(guidance_scale)}


def _pipeline_class(path: Path) -> str:
    index = path / "model_index.json"
    if not index.is_file():
        raise BadInput(f"checkpoint {path}: no model_index.json (not a diffusers pipeline folder)")
    name = read_json(index, "pipeline index").get("_class_name", "")
    if name not in SUPPORTED_PIPELINES:
        raise BadInput(f"checkpoint {path}: evaluate and refine take the pipelines {', '.join(SUPPORTED_PIPELINES)}, "
                       f"not {name or '(no _class_name)'}")
    return name


def _encode(pipe, kind: str, texts: list[str], negative: str | None, device) -> tuple[dict, dict]:
    """The conditioning inputs of ``texts`` ((P, ...) tensors) and of the negative prompt ((1, ...)),
    the text encoders run once per prompt, ``ENCODE_BATCH`` prompts at a time."""
    chunks, neg = [], None
    for i in range(0, len(texts), ENCODE_BATCH):
        batch = texts[i:i + ENCODE_BATCH]
        guided = neg is None  # the negative prompt is encoded with the first batch
        negatives = None if negative is None else [negative] * len(batch)
        common = dict(device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                      negative_prompt=negatives)
        if kind == "StableDiffusion3Pipeline":
            pe, ne, pooled, npooled = pipe.encode_prompt(prompt=batch, prompt_2=None, prompt_3=None, **common)
        elif kind == "StableDiffusionXLPipeline":
            pe, ne, pooled, npooled = pipe.encode_prompt(prompt=batch, **common)
        else:
            (pe, ne), pooled, npooled = pipe.encode_prompt(prompt=batch, **common), None, None
        chunks.append(_network_inputs(pipe, kind, pe, pooled))
        if guided:
            neg = {name: t[:1] for name, t in _network_inputs(pipe, kind, ne, npooled).items()}
    embeds = {name: torch.cat([c[name] for c in chunks]).detach() for name in chunks[0]}
    return embeds, {name: t.detach() for name, t in neg.items()}


def _network_inputs(pipe, kind: str, embeds: torch.Tensor, pooled: torch.Tensor | None) -> dict:
    """The network's conditioning keywords for a batch of prompt embeddings (and the pooled ones of
    SDXL and SD3); dotted names are entries of a keyword's dict (``added_cond_kwargs``)."""
    if kind == "StableDiffusion3Pipeline":
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if kind == "StableDiffusionXLPipeline":
        ids = _sdxl_time_ids(pipe, embeds.dtype, pooled.shape[-1]).to(embeds.device)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs.text_embeds": pooled,
                "added_cond_kwargs.time_ids": ids.expand(len(embeds), -1)}
    return {"encoder_hidden_states": embeds}


def _sdxl_time_ids(pipe, dtype, pooled_dim: int) -> torch.Tensor:
    """SDXL's added time ids, (1, 6): original size, crop top-left (0, 0) and target size, both the
    network's default image size, as the pipeline's call uses by default."""
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=dtype)
    expected = pipe.unet.add_embedding.linear_1.in_features
    if int(pipe.unet.config.addition_time_embed_dim) * 6 + pooled_dim != expected:
        raise BadInput("SDXL pipeline: its UNet's added embedding does not fit six time ids and the pooled text "
                       "embedding (a refiner or an image-to-image UNet?)")
    return ids


@contextmanager
def _quiet_loading(diffusers):
    """No progress bars or info messages from diffusers and transformers while a pipeline loads
    (stderr is the CLI's); their settings are restored afterwards."""
    libs = [diffusers.utils.logging]
    try:
        import transformers

        libs.append(transformers.utils.logging)
    except ImportError:  # the pipeline's loading says what is missing
        pass
    bars = [lib.is_progress_bar_enabled() for lib in libs]
    levels = [lib.get_verbosity() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, on, level in zip(libs, bars, levels):
            lib.set_verbosity(level)
            if on:
                lib.enable_progress_bar()


def load_text_to_image(path, prompts: list[str], holdout_prompts: list[str] | None = None,
                       negative_prompt: str | None = None, device="cpu", dtype=torch.float32, schedule=None,
                       prediction_type: str | None = None) -> Checkpoint:
    """The denoising network of the text-to-image pipeline folder ``path`` conditioned on
    ``prompts`` (then ``holdout_prompts``), each encoded once: a Checkpoint with a ``PromptSet``.

    ``negative_prompt``: the unconditional prompt of guidance (None: the pipeline's default, the
    empty prompt). ``schedule`` and ``prediction_type`` as in ``checkpoints.load_checkpoint``
    (the pipeline's scheduler config names both). The network runs in ``dtype`` on ``device``; the
    embeddings are computed there, in that dtype. Every problem is a BadInput with one line.
    """
    prompts = [str(p) for p in prompts]
    held = [str(p) for p in holdout_prompts] if holdout_prompts else []
    if not prompts:
        raise bad_setting("prompts", "give at least one prompt")
    base = load_checkpoint(path, device=device, dtype=dtype, schedule=schedule, prediction_type=prediction_type)
    if base.kind != "pipeline":
        raise bad_setting("prompts", f"apply to text-to-image pipelines; {path} is a {base.kind} checkpoint")
    p = Path(path)
    kind = _pipeline_class(p)
    diffusers = import_diffusers()
    try:
        with warnings.catch_warnings(), _quiet_loading(diffusers):
            warnings.simplefilter("ignore")
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype)
    except Exception as exc:  # missing or mismatched components raise many kinds of errors
        raise BadInput(f"checkpoint {path}: cannot load the pipeline ({first_line(exc)})") from None
    network = pipe.transformer if kind == "StableDiffusion3Pipeline" else pipe.unet
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.to(device)
    try:
        network.to(device)
    except Exception as exc:
        raise BadInput(f"checkpoint {path}: cannot move the model to {device} ({first_line(exc)})") from None
    try:
        with torch.no_grad():
            embeds, negative = _encode(pipe, kind, prompts + held, negative_prompt, torch.device(device))
    except BadInput:
        raise
    except Exception as exc:  # a tokenizer or encoder that does not fit the pipeline
        raise BadInput(f"checkpoint {path}: cannot encode the prompts ({first_line(exc)})") from None
    network.eval().requires_grad_(False)
    keys = [_sha256({n: t[i] for n, t in embeds.items()}) for i in range(len(prompts) + len(held))]
    prompt_set = PromptSet(prompts + held, len(prompts), "" if negative_prompt is None else negative_prompt,
                           embeds, negative, keys, _sha256(negative))
    cfg = network.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
    shape = (int(cfg.in_channels), int(size[0]), int(size[1]))
    del pipe  # the text encoders and the VAE are not needed any more
    return replace(base, kind="transformer" if kind == "StableDiffusion3Pipeline" else "unet", model=network,
                   sample_shape=shape, model_class=type(network).__name__, prompts=prompt_set, latent=True,
                   note=f"{kind}: latent model, measured in latent space; prompts encoded once")


def load_model(path, *, device="cpu", dtype=torch.float32, schedule=None, null_class: int | None = None,
               prompts=None, holdout_prompts=None, negative_prompt: str | None = None,
               class_labels=None) -> Checkpoint:
    """The checkpoint ``evaluate`` and ``refine`` measure: ``checkpoints.load_checkpoint``'s, or for
    a text-to-image pipeline its network conditioned on ``prompts`` (``load_text_to_image``), which
    a pipeline needs and any other checkpoint refuses, like ``holdout_prompts`` and
    ``negative_prompt`` without them. ``class_labels`` (the labels the caller will pair with the
    noises, None for none) are refused beside prompts before anything loads."""
    if prompts is not None and class_labels is not None:
        raise bad_setting("class_labels", "apply to class-conditional models; a text-to-image pipeline takes prompts")
    if prompts is None:
        for setting, value in (("holdout_prompts", holdout_prompts), ("negative_prompt", negative_prompt)):
            if value is not None:
                raise bad_setting(setting, "needs prompts: give the prompts of a text-to-image pipeline too")
    ckpt = load_checkpoint(path, device=device, dtype=dtype, schedule=schedule,
                           null_class=None if prompts is not None else null_class)
    if ckpt.kind != "pipeline":
        if prompts is not None:
            raise bad_setting("prompts", f"apply to text-to-image pipelines; {path} is a {ckpt.kind} checkpoint")
        return ckpt
    if prompts is None:
        raise mentioning("prompts", f"{path} is a text-to-image pipeline: give {{setting}} (a file with one prompt "
                                    "per line)")
    if null_class is not None:
        raise bad_setting("null_class", "applies to class-conditional models; a text-to-image pipeline's "
                                        "unconditional input is the negative prompt")
    return load_text_to_image(path, prompts, holdout_prompts, negative_prompt, device=device, dtype=dtype,
                              schedule=schedule)
