"""Running a model on torch: devices, noise, the denoiser's inputs and outputs, and the solver loop.

Units and conventions:

- the forward process is x_t = alpha_t x_0 + sigma_t eps, eps ~ N(0, I); t is the schedule's
  time, lambda = log(alpha_t / sigma_t) its log-SNR; a sampler runs from the noise end t_0 = T
  (lowest lambda) to the data end t_N = eps (highest lambda);
- a *denoiser* returns the data prediction x0_hat and has the call signature
  ``d(x, t, timestep, alpha, sigma) -> x0_hat``: ``x`` a state tensor (B, *sample_shape), ``t``
  the schedule time (float), ``timestep`` the network's timestep input (what
  ``Schedule.model_timestep(t)`` gives: (t - 1/M) M for discrete DDPM schedules, 1000 t for flow
  models) and ``alpha``, ``sigma`` alpha_t and sigma_t (floats or 0-d tensors); x0_hat has the
  dtype and device of ``x``;
- a network's output becomes x0_hat by ``to_data_prediction`` according to its prediction type:
  ``epsilon``, ``sample``, ``v_prediction`` (VP only) or ``flow_prediction`` (the velocity
  eps - x_0 of x_t = (1 - t) x_0 + t eps, so sigma = t);
- noises are drawn on the CPU in float32, one generator per seed, so a sample does not depend on
  the device or on the batch it was drawn in;
- under torchrun the processes (ranks) split a list of seeds, rank r taking every world-th one
  from the r-th (``Ranks``), and put per-seed results back in the list's order.

May import torch, numpy and the torch-free package modules (errors, schedules, solvers); the
modules that run models (mixtures, checkpoints, sample, gradients, evaluate, refine) import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .errors import BadInput, bad_setting, mentioning
from .schedule_sources import PREDICTION_TYPES
from .solvers import run_plan


Denoiser = Callable[..., torch.Tensor]


def denoiser_for(denoiser, labels: torch.Tensor | None = None) -> Denoiser:
    """The denoiser of one batch of states: ``denoiser`` itself without ``labels``; with them (one
    class label per row of the batch, a (B,) int tensor) ``denoiser(labels)``, ``denoiser`` then
    being a function of the labels (``checkpoints.labelled_denoiser``)."""
    return denoiser if labels is None else denoiser(labels)


# --- devices and noise ---------------------------------------------------------------------------

AUTO_DEVICE = "auto"  # the default --device of sample, evaluate and refine


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when this machine has it, else the CPU), ``cpu``, ``cuda`` or ``cuda:K`` (a GPU
    this machine has) as a torch device; else BadInput."""
    if name == AUTO_DEVICE:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise bad_setting("device", f"{name!r}: choose auto, cpu, cuda or cuda:K")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise mentioning("device", f"{{setting}} {name}: CUDA is not available on this machine "
                                       f"(torch {torch.__version__}); use {{setting}} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise bad_setting("device", f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def noise_for(seeds, shape, scale: float) -> torch.Tensor:
    """One standard normal tensor of ``shape`` per seed, drawn on the CPU in float32, times scale:
    (len(seeds), *shape)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * scale


@contextmanager
def full_precision():
    """CUDA matrix products and convolutions in true float32 (TF32 off) inside the block: TF32's
    ~1e-3 relative rounding would swamp the small error differences that measured errors and
    their gradients compare. The flags are restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- several processes (torchrun) ----------------------------------------------------------------

def distributed() -> tuple[int, int]:
    """(rank, world) of a torchrun launch, initializing the process group; (0, 1) otherwise.

    The backend is nccl where CUDA is available (each rank's current CUDA device then being
    cuda:LOCAL_RANK), else gloo; ``DMSTEPS_BACKEND=gloo`` chooses gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        nccl = torch.cuda.is_available() and os.environ.get("DMSTEPS_BACKEND") != "gloo"
        if nccl:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if nccl else "gloo")
    return dist.get_rank(), dist.get_world_size()


def end_distributed(wait: bool = True) -> None:
    """End the process group of a torchrun launch, if one is initialized. With ``wait`` (a run that
    ended normally, on every rank alike) every rank first waits for the others: a rank that tore its
    connections down while another was still ending its own made that one abort in gloo
    ("terminate called without an active exception", seen under load). A rank that ends on an
    error does not wait: the others may be in another collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def local_rank() -> int:
    """This process's index on its machine in a torchrun launch (``LOCAL_RANK``); 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes that share one measurement's noises: a
    torchrun launch's rank and world (``current``), 0 of 1 for a single process.

    Rank r holds the items r, r + world, r + 2 world, ... of a list (``share``). ``total``,
    ``mean`` and ``gather`` are collective: every rank calls them in the same order, and every
    rank gets the same bits back (each rank's part is gathered and combined in rank order, not
    reduced in an order the backend chooses), so ranks that decide by these numbers decide alike.
    With world 1 they return their argument."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> Ranks:
        """The initialized process group's rank and world (``distributed``); 0 of 1 without one."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return Ranks(dist.get_rank(), dist.get_world_size())
        return Ranks()

    def share(self, items) -> list:
        """This rank's items of ``items``: every world-th one from the rank-th."""
        return list(items)[self.rank::self.world]

    def own(self, indices) -> list[int]:
        """Of ``indices`` (positions in a list), those of items this rank holds, as positions in its
        ``share`` of the list."""
        return [int(i) // self.world for i in indices if int(i) % self.world == self.rank]

    def total(self, value) -> np.ndarray:
        """The sum over the ranks of ``value`` (a number or an array of one shape on every rank), in
        float64, added in rank order."""
        value = np.asarray(value, dtype=np.float64)
        if self.world == 1:
            return value
        total = np.zeros_like(value)
        for part in self._parts(value):
            total += part
        return total

    def mean(self, local_mean, count: int) -> np.ndarray:
        """The mean over every rank's items, from this rank's mean ``local_mean`` (a number or an
        array of one shape on every rank) over its ``count`` items; float64."""
        local_mean = np.asarray(local_mean, dtype=np.float64)
        if self.world == 1:
            return local_mean
        sums = self.total(np.append(local_mean.ravel() * count, count))
        return (sums[:-1] / sums[-1]).reshape(local_mean.shape)

    def gather(self, values) -> np.ndarray:
        """The rows of every rank's ``values`` (one row per item of its ``share`` of a list) in the
        list's order: (len(list), *row shape)."""
        values = np.asarray(values)
        if self.world == 1:
            return values
        parts = self._parts(values)
        out = np.empty((sum(len(p) for p in parts), *values.shape[1:]), dtype=values.dtype)
        for rank, part in enumerate(parts):
            out[rank::self.world] = part
        return out

    def _parts(self, value) -> list:
        """Every rank's ``value``, in rank order (all-gathered)."""
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, value)
        return parts


def rank_device(name: str) -> torch.device:
    """The device ``name`` (``resolve_device``) for this process: under a process group of several
    ranks a CUDA device is this rank's own, cuda:LOCAL_RANK."""
    device = resolve_device(name)
    if device.type == "cuda" and Ranks.current().world > 1:
        return torch.device("cuda", local_rank())
    return device


def gather_by_seed(rank: int, world: int, seeds: list[int], samples: np.ndarray):
    """All ranks' (seeds, samples) on rank 0, ordered by seed; None on the other ranks. Ends the
    process group of a torchrun launch."""
    if world == 1:
        return seeds, samples
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, (seeds, samples))
    end_distributed()
    if rank != 0:
        return None
    all_seeds = [s for p in parts for s in p[0]]
    all_samples = np.concatenate([p[1] for p in parts if len(p[0])], axis=0)
    order = np.argsort(all_seeds, kind="stable")
    return [all_seeds[i] for i in order], all_samples[order]


# --- the denoiser's inputs and outputs -----------------------------------------------------------

def _scalar(value):
    """numpy scalars and 0-d arrays -> Python float (they do not mix with tensors); others unchanged."""
    if isinstance(value, (np.generic, np.ndarray)):
        return float(value)
    return value


def to_data_prediction(output, x, alpha, sigma, prediction_type: str):
    """Convert a network ``output`` at ``x`` = x_t to the data prediction x0_hat.

    ``alpha``, ``sigma``: alpha_t and sigma_t (Python floats, numpy scalars or 0-d tensors).
    epsilon: x0 = (x - sigma out) / alpha; sample: x0 = out; v_prediction: x0 = alpha x - sigma out
    (valid where alpha^2 + sigma^2 = 1); flow_prediction: out = eps - x0 for x_t = (1 - t) x0 + t eps,
    so x0 = x - t out with t = sigma.
    """
    alpha, sigma = _scalar(alpha), _scalar(sigma)
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output
    if prediction_type == "flow_prediction":
        return x - sigma * output
    raise BadInput(f"unknown prediction_type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")


def timestep_tensor(timestep, n: int, device: torch.device) -> torch.Tensor:
    """The network's timestep input for a batch of ``n`` as a (n,) tensor, typed as diffusers
    pipelines do: a Python float becomes float64 (float32 on mps/npu), an int int64 (int32 on
    mps/npu); a tensor keeps its dtype. One value per sample of half the batch is repeated for a
    doubled (guided) batch."""
    if torch.is_tensor(timestep):
        ts = timestep.to(device)
    else:
        small = device.type in ("mps", "npu")
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            ts = torch.tensor(int(timestep), dtype=torch.int32 if small else torch.int64, device=device)
        else:
            ts = torch.tensor(float(timestep), dtype=torch.float32 if small else torch.float64, device=device)
    if ts.ndim == 0:
        return ts.expand(n)
    ts = ts.reshape(-1)
    if ts.numel() == 1:
        return ts.expand(n)
    if ts.numel() == n:
        return ts
    if 2 * ts.numel() == n:
        return torch.cat([ts, ts])
    raise BadInput(f"got {ts.numel()} timesteps for a batch of {n}")


NETWORK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def network_dtype_named(name: str, setting: str = "network_dtype") -> torch.dtype:
    """The torch dtype a network may run in, by name (``NETWORK_DTYPES``); else BadInput for the
    setting ``setting``."""
    if name not in NETWORK_DTYPES:
        raise bad_setting(setting, f"{name!r}: choose from {', '.join(NETWORK_DTYPES)}")
    return NETWORK_DTYPES[name]


def state_dtype(ckpt) -> torch.dtype:
    """The solver's state for a checkpoint: float64 for the closed-form mixtures (kind "gmm", whose
    errors are checked exactly), float32 otherwise."""
    return torch.float64 if ckpt.kind == "gmm" else torch.float32


# --- integration ---------------------------------------------------------------------------------

def integrate(denoiser: Denoiser, schedule, plan, t, timesteps, x, progress=None) -> torch.Tensor:
    """Apply a solver plan (``solvers.build_plan``, float coefficients) to the state ``x`` at
    t[0] with ``denoiser``; the state at t[N].

    ``t``: the N + 1 node times, noise end first; ``timesteps``: the N model inputs at t[0..N-1];
    ``progress(k, N)`` is called after each model evaluation. No autograd graph is built.
    """
    alpha, sigma = [float(v) for v in schedule.alpha(t)], [float(v) for v in schedule.sigma(t)]

    def denoise(state, k):
        out = denoiser(state, float(t[k]), timesteps[k], alpha[k], sigma[k]).to(state.dtype)
        if progress is not None:
            progress(k + 1, plan.nfe)
        return out

    with torch.no_grad():
        return run_plan(plan, x, denoise)


def rms_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """RMS(x - ref) over each sample's dimensions, in float64: (B,) for states (B, *shape).
    Differentiable in x."""
    d = (x - ref).reshape(x.shape[0], -1).double()
    return d.square().mean(dim=1).sqrt()
