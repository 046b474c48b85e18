"""The proxy data sets: data whose ideal denoiser is known in closed form, standing in for real data.

The mixtures centred on small real images (scikit-learn's digits and sample photos, scikit-image's
bundled photos) are equal-weight mixtures, 1797 components by default, sample shape
(1, side, side), pixels in [-1, 1], component std ``std``; their closed-form denoiser is the ideal
denoiser of that data (``dmsteps_cli.mixtures.GaussianMixture``). The spectral Gaussians are one
diagonal Gaussian each (natural images' 1/f^2 power spectrum in the DCT basis), whose ODE
solution is exact. ``PROXIES`` lists every proxy with what it stands in for, including the trained
UNets (their folders under build/, made by their make targets); ``make proxies``
(studies/make_proxies.py) writes the closed-form ones to build/proxies/; docs/research/proxies.md is the
table. The studies measure sampling errors on them; they are not part of the dmsteps package.
scikit-learn (with Pillow for its photos) and scikit-image (the ``studies`` extra) are imported
inside the functions.

    from studies.proxy_data import PROXIES, proxy_checkpoint, digits_mixture
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.errors import BadInput
from dmsteps_cli.mixtures import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]


def digits_mixture(std: float = 0.05, dtype=torch.float64, device="cpu") -> GaussianMixture:
    """Equal-weight mixture centred on scikit-learn's 1797 bundled 8x8 digits, pixels in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BadInput("the digits mixture needs scikit-learn: pip install scikit-learn") from None
    data = load_digits().data.astype(np.float64)  # (1797, 64), values 0..16
    return GaussianMixture(data / 8.0 - 1.0, std, sample_shape=(1, 8, 8), dtype=dtype, device=device)


def patches_mixture(std: float = 0.05, n: int = 1797, seed: int = 0, dtype=torch.float64,
                    device="cpu") -> GaussianMixture:
    """Equal-weight mixture centred on ``n`` 8x8 grey patches of scikit-learn's two bundled photos
    (china.jpg, flower.jpg; grey = mean of RGB, pixels in [-1, 1]), taken alternately from the two
    at positions drawn with ``seed``: natural-image data, low contrast within a patch (mean RMS
    0.10 around the patch mean, vs 0.75 for the digits), unlike the digits' strokes."""
    try:
        from sklearn.datasets import load_sample_images
        images = load_sample_images().images
    except ImportError:
        raise BadInput("the patches mixture needs scikit-learn and Pillow: pip install scikit-learn pillow") from None
    grey = [im.astype(np.float64).mean(axis=-1) / 127.5 - 1.0 for im in images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 64))
    for i in range(n):
        im = grey[i % len(grey)]
        y, x = rng.integers(0, im.shape[0] - 8), rng.integers(0, im.shape[1] - 8)
        out[i] = im[y:y + 8, x:x + 8].reshape(-1)
    return GaussianMixture(out, std, sample_shape=(1, 8, 8), dtype=dtype, device=device)


# --- photos bundled with scikit-image ------------------------------------------------------------

# Natural photographs inside scikit-image's wheel (skimage/data/, no download): file name -> what it shows.
PHOTOS = {
    "camera.png": "the cameraman: a man with a camera on a tripod, grass, sky and buildings (512 x 512 grey)",
    "astronaut.png": "the astronaut Eileen Collins, portrait with a flag and a spacecraft model (512 x 512)",
    "coffee.png": "a cup of coffee on a table (400 x 600)",
    "chelsea.png": "Chelsea the cat, close up (300 x 451)",
    "rocket.jpg": "a rocket on its launch pad, sky and gantry (427 x 640)",
    "motorcycle_left.png": "a motorcycle in a cluttered room, left view of a stereo pair (500 x 741)",
}


def photo_path(name: str) -> Path:
    """The path of one of ``PHOTOS`` inside the installed scikit-image (its bundled data folder)."""
    try:
        import skimage
    except ImportError:
        raise BadInput("the photo proxies need scikit-image: pip install -e '.[studies]' "
                       "(or pip install scikit-image)") from None
    path = Path(skimage.__file__).parent / "data" / name
    if not path.is_file():
        raise BadInput(f"{name} is not bundled with scikit-image {skimage.__version__} ({path} is missing)")
    return path


def grey_photo(name: str) -> np.ndarray:
    """One of ``PHOTOS`` as a float64 (H, W) array in [-1, 1]: grey = mean of R, G, B (a grey
    photo as it is), then 8-bit values v -> v / 127.5 - 1, as ``patches_mixture`` does. Read with
    Pillow from scikit-image's data folder (``photo_path``)."""
    from PIL import Image

    with Image.open(photo_path(name)) as f:
        im = np.asarray(f, dtype=np.float64)
    if im.ndim == 3:
        im = im[..., :3].mean(axis=-1)
    return im / 127.5 - 1.0


def photo_patches_mixture(side: int = 8, n: int = 1797, std: float = 0.05, seed: int = 0,
                          dtype=torch.float64, device="cpu") -> GaussianMixture:
    """Equal-weight mixture centred on ``n`` side x side grey patches of the six photos of ``PHOTOS``
    (scikit-image's bundled photographs; grey and [-1, 1] as ``grey_photo``), taken from the
    photos in turn at positions drawn with ``seed``; sample shape (1, side, side), component std
    ``std`` (pixel units). Natural-image data: low contrast within a patch, one mode per patch."""
    side, n = int(side), int(n)
    if side < 1 or n < 1:
        raise BadInput(f"side and n must be >= 1, got side {side}, n {n}")
    grey = [grey_photo(name) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    out = np.empty((n, side * side))
    for i in range(n):
        im = grey[i % len(grey)]
        y, x = rng.integers(0, im.shape[0] - side + 1), rng.integers(0, im.shape[1] - side + 1)
        out[i] = im[y:y + side, x:x + side].reshape(-1)
    return GaussianMixture(out, std, sample_shape=(1, side, side), dtype=dtype, device=device)


def photo_tiles(side: int = 8) -> np.ndarray:
    """Every non-overlapping side x side tile of the six ``PHOTOS`` (grey, [-1, 1]; tiles from the
    top left corner, the remainder at the right and bottom edges left out): (n, side, side)."""
    tiles = []
    for name in PHOTOS:
        im = grey_photo(name)
        h, w = (im.shape[0] // side) * side, (im.shape[1] // side) * side
        tiles.append(im[:h, :w].reshape(h // side, side, w // side, side).swapaxes(1, 2).reshape(-1, side, side))
    return np.concatenate(tiles)


def photo_statistics(side: int = 8) -> tuple[float, float]:
    """(pixel variance, DC share) of the photo tiles ``photo_tiles(side)``: the mean over tiles and
    pixels of x^2 (the second moment around 0, pixel units squared), and the share of it that is
    the tile mean's, E[m^2] / E[x^2] (m = a tile's mean pixel: in an orthonormal DCT the DC
    coefficient is side * m, so this is the DC coefficient's share of the total variance)."""
    tiles = photo_tiles(side)
    second = float(np.mean(tiles ** 2))
    return second, float(np.mean(tiles.mean(axis=(1, 2)) ** 2)) / second


# photo_statistics(8) to 4 digits (23958 tiles; tests/test_proxies.py recomputes them): the default
# pixel variance and DC share of spectral_gaussian
PHOTO_PIXEL_VARIANCE = 0.2670
PHOTO_DC_SHARE = 0.9062


# --- Gaussian data with a natural-image power spectrum -------------------------------------------

def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (n, n), float64: row k is the basis vector of frequency
    k / (2 n) cycles per pixel, B[k, i] = c_k cos(pi (2 i + 1) k / (2 n)), c_0 = sqrt(1 / n),
    c_k = sqrt(2 / n). Coefficients of an (n, n) image P are B P B^T; the image is B^T X B."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    b = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    b[0] /= np.sqrt(2.0)
    return b


def dct_frequencies(side: int) -> np.ndarray:
    """(side, side): the radial frequency of DCT coefficient (u, v), sqrt(u^2 + v^2) / (2 side), in
    cycles per pixel (0 for the DC term, up to about 0.7)."""
    u = np.arange(side, dtype=np.float64)
    return np.sqrt(u[:, None] ** 2 + u[None, :] ** 2) / (2 * side)


def spectral_variances(side: int, exponent: float = 2.0, pixel_variance: float | None = None,
                       dc_share: float | None = None) -> np.ndarray:
    """(side, side) variances of the DCT coefficients of ``spectral_gaussian`` (pixel units squared).

    The AC coefficients (u, v) != (0, 0) have variance c f^-exponent (f: ``dct_frequencies``); the
    DC coefficient, where f = 0 would make that infinite, has its own finite variance. Together
    they sum to side^2 ``pixel_variance`` (the mean variance of a pixel), of which the DC term
    holds ``dc_share``: by default the 8x8 photo tiles' values (``PHOTO_PIXEL_VARIANCE``,
    ``PHOTO_DC_SHARE``) at every side.
    """
    side = int(side)
    pixel_variance = PHOTO_PIXEL_VARIANCE if pixel_variance is None else float(pixel_variance)
    dc_share = PHOTO_DC_SHARE if dc_share is None else float(dc_share)
    if side < 2:
        raise BadInput(f"side must be >= 2 (one AC coefficient at least), got {side}")
    if not pixel_variance > 0 or not 0 < dc_share < 1:
        raise BadInput(f"need pixel_variance > 0 and 0 < dc_share < 1, got {pixel_variance}, {dc_share}")
    f = dct_frequencies(side)
    ac = np.zeros_like(f)
    ac[f > 0] = f[f > 0] ** -float(exponent)
    total = side * side * pixel_variance
    lam = ac * ((1.0 - dc_share) * total / ac.sum())
    lam[0, 0] = dc_share * total
    return lam


def spectral_gaussian(side: int, exponent: float = 2.0, pixel_variance: float | None = None,
                      dc_share: float | None = None, dtype=torch.float64, device="cpu") -> GaussianMixture:
    """Zero-mean Gaussian side x side images whose power spectrum falls as 1/f^exponent (natural
    images: exponent about 2), as one diagonal Gaussian in the orthonormal 2-D DCT basis.

    Sample shape (1, side, side) holds the DCT coefficients (coefficient (u, v) at row u, column
    v; ``dct_to_pixels`` gives the image), independent, with the variances of
    ``spectral_variances``: D = side^2 dimensions (side 8, 16, 32: 64, 256, 1024). The pixel-domain
    data is N(0, Q^T diag(lambda) Q), Q = B kron B (``dct_matrix``) orthogonal. The diagonal
    form measures the same errors as the pixel data: x_t = alpha x_0 + sigma eps maps under Q
    to the same form with Q eps ~ N(0, I); the ideal denoiser commutes with Q; every solver step
    is a linear combination of states and denoiser outputs, so the solution from Q x_T is Q times
    the pixel solution from x_T; and RMS(Q e) = RMS(e). A seed's noise is read as coefficients,
    so its error equals the pixel data's error from the noise Q^T x_T (also standard normal):
    per-seed numbers differ from a pixel-domain run with the same seeds, their distribution
    does not. K = 1, so the reference is the closed-form ODE solution (``GaussianMixture.ode_solution``).
    """
    lam = spectral_variances(side, exponent, pixel_variance, dc_share)
    D = lam.size
    return GaussianMixture(np.zeros((1, D)), np.sqrt(lam).reshape(1, D), sample_shape=(1, side, side),
                           dtype=dtype, device=device)


def dct_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images from DCT coefficients: (B, C, side, side) -> (B, C, side, side), B^T X B per channel
    (``dct_matrix``), in ``x``'s dtype."""
    b = torch.as_tensor(dct_matrix(x.shape[-1]), dtype=x.dtype, device=x.device)
    return b.T @ x @ b


# --- the registry ----------------------------------------------------------------------------------

DEFAULT_SCHEDULE = "scaled_linear"  # what a closed-form proxy's file records unless told otherwise


@dataclass(frozen=True)
class Proxy:
    """One proxy data set: what it stands in for, where it comes from, how it is made.

    Closed-form proxies have ``build`` (the mixture; its file, ``make proxies``, records
    ``schedule``); trained ones have ``model``, a diffusers folder relative to the repository root
    that ``rebuild`` (a make target) trains, on the schedule it was trained with, measured with
    ``guidance_scale`` and ``class_labels`` where it is class-conditional. ``reference``: how the
    Evaluator's reference solution is obtained.
    """

    name: str
    sample_shape: tuple[int, ...]
    stands_in_for: str
    source: str
    rebuild: str
    reference: str
    build: Callable[[], GaussianMixture] | None = None
    model: str | None = None
    schedule: str | None = DEFAULT_SCHEDULE
    guidance_scale: float = 1.0
    class_labels: tuple[int, ...] | None = None

    @property
    def dims(self) -> int:
        return math.prod(self.sample_shape)

    @property
    def closed_form(self) -> bool:
        return self.build is not None


_EXACT = "closed form: the exact ODE solution (K = 1)"
_MIXTURE = "numerical: exact denoiser, UniPC reference to the Evaluator's tolerance"
_NETWORK = "numerical: the network, UniPC reference to the Evaluator's tolerance"
_PHOTO_SOURCE = "scikit-image's bundled photos (" + ", ".join(n.split(".")[0] for n in PHOTOS) + ")"


def _spectral(side: int) -> Proxy:
    return Proxy(f"spectral-{side * side}", (1, side, side),
                 f"natural images' second-order statistics at {side}x{side}: power spectrum 1/f^2, "
                 "photo pixel variance",
                 "closed form (1/f^2 spectrum in the 2-D DCT basis; variance and DC share of 8x8 photo tiles)",
                 "make proxies", _EXACT, build=lambda: spectral_gaussian(side))


def _photos(side: int) -> Proxy:
    return Proxy(f"photo-patches-{side}", (1, side, side),
                 f"natural-image data at {side}x{side}: grey photo patches, many modes of low contrast",
                 f"1797 patches of {_PHOTO_SOURCE}", "make proxies", _MIXTURE,
                 build=lambda: photo_patches_mixture(side))


PROXIES: dict[str, Proxy] = {p.name: p for p in [
    Proxy("digits", (1, 8, 8), "small images of sharp high-contrast strokes: 8x8 handwritten digits",
          "scikit-learn load_digits (1797 bundled 8x8 digits)", "make proxies", _MIXTURE, build=digits_mixture),
    Proxy("sklearn-patches", (1, 8, 8), "natural-image data at 8x8 from two photos (the studies' patches mixture)",
          "1797 patches of scikit-learn's sample photos (china, flower)", "make proxies", _MIXTURE,
          build=patches_mixture),
    _photos(8),
    _photos(16),
    _spectral(8),
    _spectral(16),
    _spectral(32),
    Proxy("digits-unet", (1, 8, 8), "a trained pixel-space network (epsilon, DDPM linear betas) and its errors",
          "UNet2DModel trained on the digits (studies/train_digits.py)", "make digits-model", _NETWORK,
          model="build/digits-model", schedule=None),
    Proxy("patches-unet", (1, 8, 8), "a trained network on natural-image patches with Stable Diffusion's betas",
          "UNet2DModel trained on the sklearn patches (train_digits.py --data patches --betas scaled_linear)",
          "make patches-model", _NETWORK, model="build/patches-model", schedule=None),
    Proxy("digits-cond-unet", (1, 8, 8), "a class-conditional network sampled with classifier-free guidance (scale 3)",
          "UNet2DModel trained on the digits with labels 0-9, null class 10 (train_digits.py --class-conditional)",
          "make digits-cond-model", _NETWORK, model="build/digits-cond-model", schedule=None, guidance_scale=3.0,
          class_labels=tuple(range(10))),
]}


def proxy(name: str) -> Proxy:
    """The registered proxy ``name`` (BadInput naming the others when there is none)."""
    if name not in PROXIES:
        raise BadInput(f"no proxy {name!r}: choose from {', '.join(PROXIES)}")
    return PROXIES[name]


def trained_model(name: str, rebuild: bool = False) -> Path:
    """The folder of trained proxy ``name``. Where it is missing: with ``rebuild``, ``make`` its
    target first (minutes on a CPU); without, BadInput naming the target."""
    p = proxy(name)
    if p.model is None:
        raise BadInput(f"proxy {name} is closed-form: build it with proxy_mixture({name!r})")
    folder = ROOT / p.model
    if not (folder / "unet").is_dir():
        if not rebuild:
            raise BadInput(f"proxy {name}: {p.model} is missing: run `{p.rebuild}` (or pass rebuild=True)")
        subprocess.run(p.rebuild.split(), cwd=ROOT, check=True)
    return folder


def proxy_mixture(name: str) -> GaussianMixture:
    """The mixture of closed-form proxy ``name``."""
    p = proxy(name)
    if p.build is None:
        raise BadInput(f"proxy {name} is a trained model: load it with proxy_checkpoint({name!r})")
    return p.build()


def scaled_mixture(mixture: GaussianMixture, c: float) -> GaussianMixture:
    """The mixture of c x (the data): means and standard deviations times c (a flow shift c times
    higher compensates it: docs/research/shift-placement.md)."""
    return GaussianMixture(mixture._means64 * c, mixture._std64 * c, mixture._weights64, mixture.sample_shape)


def proxy_checkpoint(name: str, schedule: str | None = None, rebuild: bool = False, scale: float = 1.0):
    """A dmsteps checkpoint of proxy ``name``: a closed-form proxy on ``schedule`` (a preset name
    or scheduler config path; default the proxy's own, ``DEFAULT_SCHEDULE``: the ideal denoiser is
    exact on any schedule), its data scaled by ``scale`` (``scaled_mixture``); a trained one loaded
    from its folder (``trained_model``) on the schedule it was trained with (``schedule``, where
    given, must be that one; ``scale`` 1)."""
    from dmsteps_cli.checkpoints import load_checkpoint, mixture_checkpoint
    from dmsteps_cli.schedule_sources import get_schedule

    p = proxy(name)
    if p.build is not None:
        mixture, label = (p.build(), f"proxy {name}") if scale == 1.0 else \
            (scaled_mixture(p.build(), scale), f"proxy {name} x {scale:g}")
        return mixture_checkpoint(mixture, get_schedule(schedule or p.schedule), label)
    if scale != 1.0:
        raise BadInput(f"proxy {name} is a trained model: its data cannot be scaled")
    return load_checkpoint(trained_model(name, rebuild), schedule=schedule)
