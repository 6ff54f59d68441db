"""Adaptive (quantile) clipping: its options and its accounting (JAX-free).

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping" (arXiv 1905.03871), Algorithm 1 with the geometric
update. Every step, besides the noisy clipped sum, the run releases a noisy
count of the sampled units whose update norm is at most the current clip
norm ``C_t``, and moves ``C`` towards the ``target_quantile`` of those norms:

    b_t   = ( sum_{units i of step t} (1[||g_i|| <= C_t] - 1/2) + N(0, count_noise_stddev^2) )
            / expected_batch_size + 1/2
    C_t+1 = C_t * exp(-learning_rate * (b_t - target_quantile))

Centring the indicator at 1/2 (the paper, Sec. 3.1) gives the count query L2
sensitivity 1/2 under adding or removing one unit, so it is a Gaussian
mechanism with noise multiplier ``2 * count_noise_stddev``; adding back the
public ``1/2`` after dividing by the public expected batch size is
post-processing (dividing by the realised batch size would release it).

Accounting (the paper's Theorem 1, exact). Both queries read the SAME sampled
units. Scale the count by ``noise_multiplier * C_t / (2 * count_noise_stddev)
/ (1/2) ...``: equivalently, divide the sum by ``noise_multiplier * C_t`` and
the count by ``count_noise_stddev``, so both carry unit-variance isotropic
noise. One unit then moves the pair by at most

    sqrt( noise_multiplier^-2 + (2 * count_noise_stddev)^-2 ) = 1 / sigma_eff

in L2 norm, so the step is ONE Gaussian mechanism on one sampled batch with
noise multiplier ``sigma_eff = (noise_multiplier^-2 + (2 count_noise_stddev)^-2)^-1/2``
(``effective_noise_multiplier``): the run is accounted as the fixed-C run
with ``sigma_eff`` in place of σ, for every sampling scheme and unit (ELS: a
user's J sampled examples move the pair by J / sigma_eff, the same mixture).
``C_t`` is a function of earlier releases only, so the steps compose
adaptively as the fixed-C ones do. A target ε is met by raising the gradient
noise (``noise_multiplier``) until ``sigma_eff`` is the calibrated one; it is
reachable only while ``2 * count_noise_stddev`` exceeds that ``sigma_eff``.

Matrix factorization (DP-FTRL, cyclic participation). The gradient noise at
step t is ``noise_multiplier * sens(C) * C_t * (C^{-1} z)_t``: the released
stream divided by ``C_t`` (public when step t starts) is the matrix mechanism
on the normalised sums ``G_t / C_t``, whose per-unit contribution is at most
1 per step, so ``sens(C)`` still bounds it. Append the counts, with their
independent noise, as an identity block: the strategy ``blockdiag(C, I)`` is
still lower-triangular in time, so the adaptive-input argument of Denisov et
al. 2022 (Thm 2.1) applies to the whole stream, and a unit in at most ``k``
steps moves it by at most ``sqrt(noise_multiplier^-2 + k (2 count_noise_stddev)^-2)``
in noise units: ``sigma_eff = (noise_multiplier^-2 + k (2 count_noise_stddev)^-2)^-1/2``
with ``k`` the plan's ``max_participations``. Amplified banded MF (cyclic
Poisson) is refused: its amplification argument is not re-derived here.
"""

from __future__ import annotations

import dataclasses
import math

from accounting import validate as check

DEFAULT_COUNT_NOISE_FRACTION = 0.05  # the paper's σ_b = m / 20 (expected batch m)


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
  """Adaptive clipping's options (``dpfl.adaptive_clip`` builds it; the plan records it).

  Attributes:
    initial: ``C_0``, the clip norm of the first step; finite, > 0.
    target_quantile: γ in (0, 1), the fraction of units meant to be left
      unclipped (the paper's default 0.5: the median norm).
    learning_rate: η > 0 of the geometric update (the paper's 0.2): ``C``
      moves by a factor of at most ``exp(η)`` per step (more only through
      the count noise).
    count_noise_stddev: σ_b > 0, the standard deviation of the Gaussian noise
      on the count of unclipped units (before dividing by the expected batch
      size). None: ``0.05 * expected_batch_size`` (the paper's m / 20),
      fixed when the run is planned.
  """

  initial: float
  target_quantile: float = 0.5
  learning_rate: float = 0.2
  count_noise_stddev: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "initial", check.positive("initial", self.initial))
    object.__setattr__(self, "target_quantile",
                       check.real("target_quantile", self.target_quantile, low=0, high=1,
                                  low_open=True, high_open=True))
    object.__setattr__(self, "learning_rate",
                       check.positive("learning_rate", self.learning_rate))
    if self.count_noise_stddev is not None:
      object.__setattr__(self, "count_noise_stddev",
                         check.noise_multiplier("count_noise_stddev", self.count_noise_stddev))

  def resolved(self, expected_batch_size: float) -> "AdaptiveClip":
    """These options with ``count_noise_stddev`` fixed (the default from the batch size)."""
    if self.count_noise_stddev is not None:
      return self
    stddev = DEFAULT_COUNT_NOISE_FRACTION * check.positive("expected_batch_size",
                                                           expected_batch_size)
    return dataclasses.replace(self, count_noise_stddev=stddev)

  @classmethod
  def from_dict(cls, data) -> "AdaptiveClip | None":
    return None if data is None else cls(**data)


def effective_noise_multiplier(noise_multiplier: float, count_noise_stddev: float, *,
                               participations: int = 1) -> float:
  """σ_eff of the (clipped sum, unclipped count) pair: one Gaussian mechanism (see above).

  ``(noise_multiplier^-2 + participations * (2 count_noise_stddev)^-2)^-1/2``:
  ``participations`` is 1 per step for independent noise, the ``k``
  participations a matrix mechanism's sensitivity covers for DP-FTRL.
  """
  noise_multiplier = check.noise_multiplier("noise_multiplier", noise_multiplier)
  count_noise_stddev = check.noise_multiplier("count_noise_stddev", count_noise_stddev)
  participations = check.positive_int("participations", participations)
  return (noise_multiplier ** -2 + participations * (2 * count_noise_stddev) ** -2) ** -0.5


def count_noise_limit(count_noise_stddev: float, *, participations: int = 1) -> float:
  """The largest σ_eff any gradient noise reaches: ``2 count_noise_stddev / sqrt(k)``."""
  return 2 * count_noise_stddev / math.sqrt(participations)
