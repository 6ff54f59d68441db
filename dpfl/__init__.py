"""dpfl: differential-privacy training for JAX."""

from dpfl.clipping import ClippedGradAux, ClippedGradFn, clipped_grad
from dpfl.noise import GaussianNoiseState, gaussian_noise, reseed
from dpfl.privatize import PrivateTraining, dp_sgd, make_private
from dpfl.sampling import Batch, PoissonSampler, ShuffledSampler, gather

__version__ = "0.1.0"

__all__ = [
    "Batch", "ClippedGradAux", "ClippedGradFn", "GaussianNoiseState", "PoissonSampler", "PrivateTraining",
    "ShuffledSampler", "clipped_grad", "dp_sgd", "gather", "gaussian_noise", "make_private",
    "reseed",
]
