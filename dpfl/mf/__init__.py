"""Matrix-factorization (DP-FTRL / DP-MF) strategies, their losses and sensitivity."""

from dpfl.mf.banded import BandedStrategy, optimize_banded
from dpfl.mf.blt import BltStrategy, optimize_blt
from dpfl.mf.build import build
from dpfl.mf.dense import DenseStrategy, optimize_dense
from dpfl.mf.online_tree import (OnlineTreeStrategy, online_tree, online_tree_gram,
                                  online_tree_matrix)
from dpfl.mf.participation import FixedEpoch, Participation, fixed_epoch, participation
from dpfl.mf.sensitivity import brute_force_sensitivity, matrix_sensitivity
from dpfl.mf.strategies import (IdentityStrategy, SqrtToeplitzStrategy, Strategy,
                                ToeplitzStrategy, TreeStrategy, identity, sqrt_toeplitz, tree,
                                tree_matrix)
from dpfl.mf.workload import Workload

__all__ = [
    "CorrelatedNoiseState", "banded_noise", "banded_strategy", "blt_noise", "blt_strategy",
    "dense_noise", "dense_strategy", "identity_noise", "matrix_noise", "noise_strategy",
    "BandedStrategy", "BltStrategy", "DenseStrategy", "FixedEpoch", "IdentityStrategy",
    "OnlineTreeStrategy", "Participation", "fixed_epoch",
    "SqrtToeplitzStrategy", "Strategy", "ToeplitzStrategy", "TreeStrategy", "Workload",
    "brute_force_sensitivity", "build", "identity", "matrix_sensitivity", "online_tree",
    "online_tree_gram", "online_tree_matrix", "optimize_banded",
    "optimize_blt", "optimize_dense", "participation", "sqrt_toeplitz", "tree", "tree_matrix",
]

# Streaming noise needs JAX; `dpfl mf` must not. Loaded on first use (PEP 562).
_STREAMING = ("CorrelatedNoiseState", "banded_noise", "banded_strategy", "blt_noise",
              "blt_strategy", "dense_noise", "dense_strategy", "identity_noise", "matrix_noise",
              "noise_strategy")


def __getattr__(name):
  if name in _STREAMING:
    from dpfl.mf import streaming
    return getattr(streaming, name)
  raise AttributeError(f"module 'dpfl.mf' has no attribute {name!r}")
