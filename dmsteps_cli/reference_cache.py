"""Reference solutions on disk: computed once per model, noise and setting, read back by later runs.

A reference solution is the state a solver reaches at t = eps from one seed's noise at t = T
(``evaluate.Evaluator``). This cache keeps each one as a file, so ``evaluate`` and ``refine`` on the
same model reuse them across NFEs, commands and runs, and a run with more noises computes only the
new ones.

Where: ``folder`` when given (``--cache DIR``), else ``$DMSTEPS_CACHE``, else
``$XDG_CACHE_HOME/dmsteps``, else ``~/.cache/dmsteps`` (``default_folder``). Layout::

    FOLDER/references/KEY/settings.json         what KEY hashes, for a reader
    FOLDER/references/KEY/SOLVER-S/SEED.npy     the solution from seed SEED's noise with S steps

KEY is the sha256 (hex) of the canonical JSON of ``settings``: the cache format; the model's
fingerprint (``model_fingerprint``: the sha256 of its weights, config, class, prediction type and
dtype; for a Gaussian mixture of its means, standard deviations and weights); the conditioning of
the seed's noise (its class label, the guidance scale and, where the guidance scale is not 1, the
null class the guidance uses; for a text-to-image network its prompt and the sha256 of the prompt's
embeddings, and with guidance the negative prompt and its embeddings' sha256); the schedule's
identity (``Schedule.identity``) and timestep convention; the interval T and eps (floats, exactly);
the noise (sample shape, the scale of the standard normal noise, which generator) and the solver
state's dtype. SOLVER names the reference
solver and its step placement (``unipc3-bh2-unif``, UniPC order 3 bh2 on steps uniform in lambda);
S is its number of steps. Each ``.npy`` holds one array of the sample shape in the state's dtype.
Where the noises of one run have different class labels (``evaluate --class-labels``, paired with
the seeds round robin), each seed's solution is kept under the KEY of its own label: a later run
reads it wherever the same seed has the same label, however the labels were paired.
The device is not part of the key: a solution computed on a GPU differs from the CPU's by rounding
only.

Changed weights give another fingerprint, hence another KEY: nothing stale is read. Files are
written atomically (``files.write_output``: a temporary file renamed into place). A file that cannot
be read, or holds an array of the wrong shape or dtype or a non-finite value, counts as missing: the
solution is computed again and the file replaced. A cache folder that cannot be written leaves the
run unchanged (the solutions are computed, ``write_errors`` says why they were not kept).

May import torch, numpy, errors and files; evaluate imports it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput, bad_setting
from .files import write_output

FORMAT = "dmsteps.reference-cache/1"
NOISE = "torch.randn float32 on the CPU, one torch.Generator per seed (runtime.noise_for), times scale"
ENV = "DMSTEPS_CACHE"


def default_folder() -> Path:
    """``$DMSTEPS_CACHE``, else ``$XDG_CACHE_HOME/dmsteps`` (an absolute XDG_CACHE_HOME only, as the
    XDG spec says), else ``~/.cache/dmsteps``."""
    own = os.environ.get(ENV, "")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "dmsteps"
    return Path.home() / ".cache" / "dmsteps"


def open_cache(folder=None, enabled: bool = True) -> ReferenceCache | None:
    """The cache in ``folder`` (default ``default_folder()``; an open ``ReferenceCache`` is itself),
    or None when not ``enabled``. BadInput (setting ``cache``) when ``folder`` exists and is not a
    folder."""
    if not enabled:
        return None
    if isinstance(folder, ReferenceCache):
        return folder
    if folder is not None and os.fspath(folder) == "":
        raise bad_setting("cache", "is empty: give a folder")
    root = default_folder() if folder is None else Path(os.fspath(folder)).expanduser()
    if root.exists() and not root.is_dir():
        raise bad_setting("cache", f"{root}: exists and is not a folder")
    return ReferenceCache(root)


# --- fingerprints --------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order (any dtype, any device)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def tensors_sha256(named) -> str:
    """sha256 of (name, dtype, shape, bytes) of each (name, tensor) of ``named``, in sorted name order."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def model_fingerprint(ckpt) -> str:
    """sha256 (hex) of what the checkpoint's denoiser computes, apart from its conditioning.

    A Gaussian mixture (``kind`` "gmm"): its float64 means, standard deviations and weights and its
    sample shape; the standard deviations in the form the mixture holds them, K values or K x D
    (diagonal components), shape included, so a diagonal mixture never shares a key with an
    isotropic one. A network: every tensor of its ``state_dict`` (parameters and buffers, by name in
    sorted order: name, dtype, shape, bytes), its class and config (less diffusers' bookkeeping
    fields ``_name_or_path``, ``_diffusers_version``, ...: a copied or moved folder keeps its key),
    and the checkpoint's prediction type and dtype. Hashing reads every weight once (about 1.3 s per
    GB on one core of the 2-core development machine).
    """
    if ckpt.kind == "gmm":
        m = ckpt.model
        weights = tensors_sha256([("means", m._means64), ("std", m._std64), ("weights", m._weights64)])
        return hashlib.sha256(f"gaussian-mixture|{list(m.sample_shape)}|{weights}".encode()).hexdigest()
    model = ckpt.model
    weights = tensors_sha256(model.state_dict().items())
    config = {k: v for k, v in dict(getattr(model, "config", {}) or {}).items() if not str(k).startswith("_")}
    head = json.dumps({"class": type(model).__name__, "config": config, "prediction_type": ckpt.prediction_type,
                       "dtype": str(ckpt.dtype)}, sort_keys=True, default=str)
    return hashlib.sha256(f"{head}|{weights}".encode()).hexdigest()


def settings(ckpt, *, T: float, eps: float, noise_scale: float, state_dtype, class_label=None,
             guidance_scale: float = 1.0, fingerprint: str | None = None) -> dict:
    """What a reference solution depends on apart from its seed, solver and step count (the
    module docstring lists it); JSON-ready. ``class_label``: the class of the seed's noise (None
    for a model without classes); ``null_class`` (``ckpt.null_class``) is recorded where
    ``guidance_scale`` is not 1, the only case where it changes the solution. ``fingerprint``:
    ``model_fingerprint(ckpt)`` when the caller has it already (None: computed here). For a
    text-to-image network (``ckpt.prompts``) ``class_label`` is the index of the seed's prompt, and
    the key holds that prompt and the hash of its embeddings (``PromptSet.key``: with guidance the
    negative prompt's too) instead of a class."""
    schedule = ckpt.schedule
    guided = float(guidance_scale) != 1.0
    prompts = getattr(ckpt, "prompts", None)
    if prompts is not None:  # a text-to-image network: the label is a prompt's index
        condition = {"class_label": None, **prompts.key(int(class_label), guided)}
    else:
        condition = {"class_label": None if class_label is None else int(class_label),
                     **({"null_class": None if ckpt.null_class is None else int(ckpt.null_class)} if guided else {})}
    return {
        "format": FORMAT,
        "model": model_fingerprint(ckpt) if fingerprint is None else fingerprint,
        "model_source": str(ckpt.source),  # for a reader only: not part of the key
        **condition,
        "guidance_scale": float(guidance_scale),
        "schedule": schedule.identity(),
        "timestep_convention": getattr(schedule, "timestep_convention", None),
        "T": float(T).hex(),
        "eps": float(eps).hex(),
        "sample_shape": [int(s) for s in ckpt.sample_shape],
        "noise": NOISE,
        "noise_scale": float(noise_scale).hex(),
        "state_dtype": str(state_dtype),
    }


def key_of(setting: dict) -> str:
    """The cache key of ``settings(...)``: sha256 of its canonical JSON, the model's source left out."""
    keyed = {k: v for k, v in setting.items() if k != "model_source"}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- the cache -----------------------------------------------------------------------------------

def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class ReferenceCache:
    """Reference solutions under ``root`` (created when first written).

    Counts since it was opened: ``hits`` (solutions read), ``misses`` (solutions not found or not
    readable, computed by the caller), ``unreadable`` (misses that were files that could not be
    read or held a wrong array) and ``written``; ``write_errors`` holds the reasons writes failed
    (the run goes on).
    """

    def __init__(self, root):
        self.root = Path(root)
        self.hits = self.misses = self.unreadable = self.written = 0
        self.write_errors: list[str] = []

    def entry(self, setting: dict) -> CacheEntry:
        """The solutions of one ``settings(...)``."""
        return CacheEntry(self, setting)

    def disk_usage(self) -> tuple[int, int]:
        """(files, bytes) under ``root``; (0, 0) where it does not exist."""
        files = size = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    size += os.lstat(os.path.join(folder, name)).st_size
                    files += 1
                except OSError:
                    pass
        return files, size

    def _write(self, path: Path, data: bytes | str) -> bool:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_output(path, data)
        except (OSError, BadInput) as exc:
            reason = str(exc) if isinstance(exc, BadInput) else f"cannot write {path}: {exc.strerror or exc}"
            if reason not in self.write_errors:
                self.write_errors.append(reason)
            return False
        return True


class CacheEntry:
    """The solutions of one key: ``load`` and ``save`` by solver name, step count and seed."""

    def __init__(self, cache: ReferenceCache, setting: dict):
        self.cache, self.settings = cache, setting
        self.key = key_of(setting)
        self.folder = cache.root / "references" / self.key
        self.shape = tuple(setting["sample_shape"])
        self.dtype = np.dtype(str(setting["state_dtype"]).removeprefix("torch."))

    def path(self, solver: str, steps: int, seed: int) -> Path:
        return self.folder / f"{solver}-{int(steps)}" / f"{int(seed)}.npy"

    def load(self, solver: str, steps: int, seeds) -> dict[int, np.ndarray]:
        """{seed: solution} for the seeds of ``seeds`` whose files hold a valid solution; the rest
        count as misses."""
        found = {}
        for seed in seeds:
            path = self.path(solver, steps, seed)
            a = self._read(path)
            if a is None:
                self.cache.misses += 1
            else:
                found[int(seed)] = a
                self.cache.hits += 1
        return found

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            if not path.is_file():
                return None
            a = np.load(path, allow_pickle=False)
        except Exception:  # a truncated or foreign file: numpy raises many kinds of errors
            self.cache.unreadable += 1
            return None
        if not (isinstance(a, np.ndarray) and a.shape == self.shape and a.dtype == self.dtype
                and bool(np.isfinite(a).all())):
            self.cache.unreadable += 1
            return None
        return a

    def save(self, solver: str, steps: int, solutions: dict) -> None:
        """Write {seed: solution (array or tensor of the sample shape)} atomically, one file each."""
        if not solutions:
            return
        info = self.folder / "settings.json"
        if not info.is_file():
            self.cache._write(info, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        for seed, x in solutions.items():
            a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
            a = np.ascontiguousarray(a.reshape(self.shape).astype(self.dtype, copy=False))
            if self.cache._write(self.path(solver, steps, seed), _npy_bytes(a)):
                self.cache.written += 1
