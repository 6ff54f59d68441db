"""dpfl: differential-privacy training for JAX.

Public names are re-exported lazily (PEP 562): ``import dpfl`` is cheap, and
the ``dpfl`` command line can live in this package without importing JAX for
``dpfl epsilon``. ``dpfl.clipped_grad`` etc. import their module on first use,
as does ``dpfl.nnx`` (Flax NNX models: ``dpfl.nnx.make_private``).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ClippedGradAux": "dpfl.clipping", "ClippedGradFn": "dpfl.clipping",
    "clipped_grad": "dpfl.clipping", "adaptive_clip": "dpfl.adaptive",
    "GaussianNoiseState": "dpfl.noise", "gaussian_noise": "dpfl.noise", "reseed": "dpfl.noise",
    "PrivateTraining": "dpfl.private_training", "PrivateState": "dpfl.private_training",
    "dp_sgd": "dpfl.privatize", "make_private": "dpfl.privatize",
    "UserLevelPrivateTraining": "dpfl.privatize", "make_private_user_level": "dpfl.privatize",
    "BudgetExhaustedError": "accounting.plan", "PrivacyPlan": "accounting.plan",
    "Batch": "dpfl.sampling", "Sampler": "dpfl.sampling", "PoissonSampler": "dpfl.sampling",
    "ShuffledSampler": "dpfl.sampling", "gather": "dpfl.sampling",
    "CyclicSampler": "dpfl.sampling", "CyclicPoissonSampler": "dpfl.sampling",
    "UserSampler": "dpfl.sampling", "ElsSampler": "dpfl.sampling",
    "UserDataset": "dpfl.data",
    "clipped_user_updates": "dpfl.federated", "user_mesh": "dpfl.federated",
    "shard_users": "dpfl.federated", "shared_secret_seed": "dpfl.federated",
}

# Subpackages reached as attributes (``dpfl.audit.one_run``, ``dpfl.nnx``:
# Flax NNX models, imports flax), imported on first use. They have API pages
# of their own, so they are not names of ``__all__``.
_SUBMODULES = ("audit", "nnx")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"dpfl.{name}")
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'dpfl' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__ + list(_SUBMODULES))
