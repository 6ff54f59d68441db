"""dpfl's privacy accounting: JAX-free, readable on its own.

A run's plan (``PrivacyPlan``: the one configuration -> mechanism map) ->
mechanism descriptions (what training ran) -> dp-accounting events -> ε(δ),
calibration, the write-ahead journal of a run, and a ledger. Importing this package does not import
dp-accounting; computing a number does.
"""

from accounting.adaptive import AdaptiveClip
from accounting.accountants import delta, epsilon, epsilon_and_discretization, epsilons
from accounting.calibrate import (Calibration, calibrate_batch_size, calibrate_noise_multiplier,
                                  calibrate_num_steps, calibrate_sampling_prob)
from accounting.group import group_privacy, group_privacy_epsilon
from accounting.journal import RunJournal
from accounting.ledger import Ledger
from accounting.matrix import AmplifiedBandedMatrixMechanism, MatrixMechanism, UserMatrixMechanism
from accounting.mechanisms import (Composed, ElsDpSgd, Mechanism, PoissonDpSgd, ShuffledDpSgd,
                                   TruncatedPoissonDpSgd, UlsDpSgd, from_dict,
                                   sampling_from_epochs)
from accounting.plan import (BudgetExhaustedError, NoisePlan, PrivacyPlan, SamplingPlan,
                             plan_run)

__all__ = [
    "AdaptiveClip", "AmplifiedBandedMatrixMechanism", "MatrixMechanism", "UserMatrixMechanism", "Calibration", "Composed", "ElsDpSgd", "Ledger", "Mechanism", "PoissonDpSgd",
    "ShuffledDpSgd", "TruncatedPoissonDpSgd", "UlsDpSgd", "calibrate_batch_size",
    "calibrate_noise_multiplier", "calibrate_num_steps", "calibrate_sampling_prob", "delta",
    "epsilon", "epsilon_and_discretization", "epsilons", "from_dict", "group_privacy",
    "group_privacy_epsilon", "sampling_from_epochs", "BudgetExhaustedError", "NoisePlan",
    "PrivacyPlan", "RunJournal", "SamplingPlan", "plan_run",
]
