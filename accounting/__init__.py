"""dpfl's privacy accounting: JAX-free, readable on its own.

Mechanism descriptions (what training ran) -> dp-accounting events -> ε(δ),
calibration, and a ledger. Importing this package does not import
dp-accounting; computing a number does.
"""

from accounting.accountants import delta, epsilon, epsilon_and_discretization, epsilons
from accounting.calibrate import (Calibration, calibrate_batch_size, calibrate_noise_multiplier,
                                  calibrate_num_steps, calibrate_sampling_prob)
from accounting.group import group_privacy, group_privacy_epsilon
from accounting.ledger import Ledger
from accounting.matrix import AmplifiedBandedMatrixMechanism, MatrixMechanism, UserMatrixMechanism
from accounting.mechanisms import (Composed, ElsDpSgd, Mechanism, PoissonDpSgd, ShuffledDpSgd,
                                   TruncatedPoissonDpSgd, UlsDpSgd, from_dict,
                                   sampling_from_epochs)

__all__ = [
    "AmplifiedBandedMatrixMechanism", "MatrixMechanism", "UserMatrixMechanism", "Calibration", "Composed", "ElsDpSgd", "Ledger", "Mechanism", "PoissonDpSgd",
    "ShuffledDpSgd", "TruncatedPoissonDpSgd", "UlsDpSgd", "calibrate_batch_size",
    "calibrate_noise_multiplier", "calibrate_num_steps", "calibrate_sampling_prob", "delta",
    "epsilon", "epsilon_and_discretization", "epsilons", "from_dict", "group_privacy",
    "group_privacy_epsilon", "sampling_from_epochs",
]
