"""The study data sets: Gaussian mixtures centred on small real images (scikit-learn's bundled data).

Each is an equal-weight mixture in 64 dimensions (1797 components by default), sample shape
(1, 8, 8), pixels in [-1, 1], component std ``std``; its closed-form denoiser is the ideal denoiser
of that data (``dmsteps_cli.mixtures.GaussianMixture``). The studies measure sampling errors on
them; they are not part of the dmsteps package. scikit-learn (and Pillow for the photos) is
imported inside the functions.

    import sys; sys.path.insert(0, "studies")
    from proxy_data import digits_mixture
"""

from __future__ import annotations

import numpy as np
import torch

from dmsteps_cli.errors import BadInput
from dmsteps_cli.mixtures import GaussianMixture


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
