"""Matrix-factorization mechanisms (DP-FTRL / DP-MF): descriptions and events.

A matrix mechanism (Denisov et al. 2022, arXiv 2202.08312; Choquette-Choo et
al. 2023, "Multi-Epoch Matrix Factorization Mechanisms", arXiv 2211.06530)
fixes a lower-triangular strategy ``C`` (n x n) for the whole run and releases

    C G + noise_multiplier * sens * C_clip * Z,     Z iid N(0, 1),

where row ``t`` of ``G`` is step ``t``'s sum of clipped contributions (each of
L2 norm ``<= C_clip``) and ``sens = sens(C)`` is the largest ``||C u||`` over
the participation patterns ``u`` one privacy unit may have (sums of unit
columns: at most ``max_participations`` steps, any two at least
``min_separation`` apart). Training uses ``C^{-1}`` of that release
(post-processing). Adding or removing one unit moves ``C G`` by at most
``sens * C_clip`` in Frobenius norm, so the whole run is ONE Gaussian mechanism
with noise multiplier ``noise_multiplier`` — not ``n`` composed steps — also
for adaptively chosen gradients (Denisov et al. 2022).

Steps and the ledger. The Gaussian release is defined for the full ``C``. A
run stopped after ``t < n`` steps released the first ``t`` rows, a
post-processing of the full release, so its ε is no larger; we never report
less than the full mechanism. ``MatrixMechanism`` therefore carries
``planned_steps`` (n, the size of ``C`` that ``sensitivity`` was computed for)
and ``num_steps`` (how many were run, 1..n); ε depends only on the noise
multiplier. Recording the same mechanism step by step in an
``accounting.Ledger`` merges the records into one entry whose ε is the full
mechanism's from the first step on. A run cannot go past its matrix:
``with_steps`` beyond ``planned_steps`` is a ``ValueError``, so the ledger
starts a new entry for a step recorded after the n-th (a second run,
composed after the first). A resumed run (the ledger seals on load) is composed with the
interrupted one: conservative, and correct even though the resumed run
re-released some rows with fresh noise.

Amplified banded MF (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix
Factorizations", arXiv 2306.08153) is different: with cyclic Poisson sampling
its privacy is that of DP-SGD over ``ceil(n / b)`` steps, which grows with
the steps run, so it counts steps like ``PoissonDpSgd``.

Like ``accounting.mechanisms``, this module imports dp-accounting only when an
event is built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from accounting import validate as check
from accounting.mechanisms import Mechanism, poisson_gaussian_event, register

# The participation patterns a matrix mechanism's sensitivity can be computed for:
# every set of steps at most k, any two at least b apart ("min-sep"), or the b
# fixed sets r, r + b, r + 2b, ... of one order repeated every epoch ("fixed-epoch").
PARTICIPATIONS = ("min-sep", "fixed-epoch")


@register
@dataclasses.dataclass(frozen=True)
class MatrixMechanism(Mechanism):
  """Example-level DP-FTRL / DP-MF: one Gaussian release ``C G + s Z`` of a whole run.

  Mechanism: for a lower-triangular strategy ``C`` (n = ``planned_steps``)
  release ``C G + noise_multiplier * sensitivity * C_clip * Z`` (Z iid
  N(0, 1)), where ``G[t]`` sums the step-``t`` gradients of the examples that
  took part, each clipped to L2 norm ``C_clip``, and every example takes part
  in at most ``max_participations`` steps, any two at least
  ``min_separation`` apart (``participation="min-sep"``, the default), or,
  with ``participation="fixed-epoch"``, one fixed order repeated every
  epoch of ``b = min_separation`` steps: example ``r`` takes part exactly at
  steps ``r, r + b, r + 2b, ...`` (then ``max_participations`` is
  ``ceil(planned_steps / b)``; Choquette-Choo et al. 2023, arXiv 2211.06530).
  ``sensitivity`` is ``sens(C)``, the largest
  ``||C u||`` over those participation patterns ``u`` (in units of
  ``C_clip``), so one example moves ``C G`` by at most
  ``sensitivity * C_clip``: a single Gaussian mechanism with noise multiplier
  ``noise_multiplier`` (``sensitivity`` is folded into the noise scale and
  recorded for the reader; it does not enter ε). The training stream
  ``G + C^{-1}(s Z)`` (``dpfl.mf.streaming``) is post-processing of it, also
  under adaptive choice of ``G`` (Denisov et al. 2022, arXiv 2202.08312).
  ``strategy`` names ``C`` (e.g. ``"blt"``, ``"banded"``, ``"dense"``,
  ``"identity"``) for the reader.

  Steps: ``num_steps`` (default ``planned_steps``) counts the steps run, at
  most ``planned_steps``; ε is that of the full planned release whatever it
  is (a prefix is post-processing of the whole). See the module docstring.

  DpEvent: ``Gaussian(noise_multiplier)`` (not composed per step).

  Attributes:
    noise_multiplier: σ, the Gaussian's noise multiplier (in units of
      ``sensitivity * C_clip``).
    sensitivity: sens(C) under the participation, in units of the clip norm
      (recorded; it does not enter ε).
    planned_steps: n, the size of C.
    strategy: the name of C, for the reader.
    max_participations: k, the most steps (rounds) a unit takes part in.
    min_separation: b, the least separation of two participations.
    num_steps: the steps run so far (default ``planned_steps``).
    participation: ``"min-sep"`` or ``"fixed-epoch"``.

  Privacy guarantee:
    (ε, δ)-DP for adding or removing one example, with ε =
    ``accounting.epsilon(self, delta=δ)``: that of one Gaussian mechanism with
    noise multiplier σ, for the whole planned run (every prefix included).
  """

  kind: ClassVar[str] = "matrix_mechanism"
  noise_multiplier: float
  sensitivity: float
  planned_steps: int
  strategy: str
  max_participations: int = 1
  min_separation: int | None = None
  num_steps: int | None = None
  participation: str = "min-sep"

  def __post_init__(self):
    object.__setattr__(self, "noise_multiplier",
                       check.noise_multiplier("noise_multiplier", self.noise_multiplier))
    object.__setattr__(self, "sensitivity", check.positive("sensitivity", self.sensitivity))
    n = check.positive_int("planned_steps", self.planned_steps)
    object.__setattr__(self, "planned_steps", n)
    if not isinstance(self.strategy, str) or not self.strategy.strip():
      raise ValueError(f"strategy must be a non-empty string naming C, got {self.strategy!r}")
    k = check.positive_int("max_participations", self.max_participations)
    object.__setattr__(self, "max_participations", k)
    if self.min_separation is None:
      if k > 1:
        raise ValueError(f"min_separation must be given (an integer >= 1) when "
                         f"max_participations = {k} > 1")
      # One participation: any separation describes it; n is the canonical one.
      object.__setattr__(self, "min_separation", n)
    b = check.positive_int("min_separation", self.min_separation)
    object.__setattr__(self, "min_separation", b)
    if (k - 1) * b > n - 1:
      raise ValueError(
          f"max_participations={k} participations at least min_separation={b} steps "
          f"apart do not fit in planned_steps={n} (need (k - 1) * b <= n - 1)")
    check.choice("participation", self.participation, PARTICIPATIONS)
    if self.participation == "fixed-epoch" and k > 1 and k != -(-n // b):
      raise ValueError(
          f"max_participations must be ceil(planned_steps / min_separation) = {-(-n // b)} "
          f"under fixed-epoch participation (planned_steps={n}, min_separation={b}), got {k}")
    steps = n if self.num_steps is None else check.positive_int("num_steps", self.num_steps)
    if steps > n:
      raise ValueError(
          f"num_steps must be <= planned_steps ({n}), got {steps}: a matrix mechanism is "
          "defined for its planned steps only; steps after them belong to a new mechanism "
          "(record it as a separate phase)")
    object.__setattr__(self, "num_steps", steps)

  def dp_event(self):
    import dp_accounting as dpa  # deferred: heavy import
    return dpa.GaussianDpEvent(self.noise_multiplier)


@register
@dataclasses.dataclass(frozen=True)
class UserMatrixMechanism(MatrixMechanism):
  """User-level DP-FTRL / DP-MF (ULS; federated DP-FTRL), one Gaussian release.

  Kairouz et al. 2021, "Practical and Private (Deep) Learning without
  Sampling or Shuffling" (arXiv 2103.00039); Choquette-Choo et al. 2023
  (arXiv 2211.06530). The privacy unit is a *user*: ``G[t]`` sums one vector
  per participating user (their clipped gradient or model delta, L2 norm
  ``<= C_clip`` however many examples they hold), and each user takes part
  in at most ``max_participations`` rounds, any two at least
  ``min_separation`` apart (e.g. ``b`` = rounds per pass over the users).
  Otherwise exactly ``MatrixMechanism``: the release ``C G +
  noise_multiplier * sensitivity * C_clip * Z`` is one Gaussian mechanism
  with noise multiplier ``noise_multiplier`` for adding or removing a user.

  DpEvent: ``Gaussian(noise_multiplier)``.

  Attributes:
    noise_multiplier: σ, the Gaussian's noise multiplier (in units of
      ``sensitivity * C_clip``).
    sensitivity: sens(C) under the participation, in units of the clip norm
      (recorded; it does not enter ε).
    planned_steps: n, the size of C.
    strategy: the name of C, for the reader.
    max_participations: k, the most steps (rounds) a unit takes part in.
    min_separation: b, the least separation of two participations.
    num_steps: the steps run so far (default ``planned_steps``).
    participation: ``"min-sep"`` or ``"fixed-epoch"``.

  Privacy guarantee:
    (ε, δ)-DP for adding or removing one *user*, with ε =
    ``accounting.epsilon(self, delta=δ)``: that of one Gaussian mechanism with
    noise multiplier σ, for the whole planned run (every prefix included).
  """

  kind: ClassVar[str] = "user_matrix_mechanism"
  privacy_unit: ClassVar[str] = "user"


@register
@dataclasses.dataclass(frozen=True)
class AmplifiedBandedMatrixMechanism(Mechanism):
  """Example-level banded MF with cyclic Poisson sampling (amplified).

  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu 2023,
  "(Amplified) Banded Matrix Factorizations: A unified approach to private
  training" (arXiv 2306.08153). Mechanism: ``C`` is lower-triangular
  and ``num_bands``-banded (``C[i, j] = 0`` for ``i - j >= num_bands``) with
  every column of L2 norm at most 1 (use ``sensitivity`` = the largest column
  norm in ``dpfl.mf.streaming``). The examples are split, independently of
  the data, into ``b = num_bands`` groups of equal size; step ``i`` includes
  each example of group ``i mod b`` independently with probability
  ``sampling_prob`` (``q = B / (N / b)``) and none of the others; the
  included examples' gradients are clipped to ``C_clip`` and summed into
  ``G[i]``, and ``C G + noise_multiplier * C_clip * Z`` is released. An
  example's steps are then ``b`` apart, so banding makes their noise
  independent, and the run is as private as DP-SGD with Poisson rate ``q``
  and noise multiplier ``noise_multiplier`` for ``ceil(num_steps / b)``
  steps. A prefix of the run is the same mechanism with fewer steps, so
  ``num_steps`` counts the steps run.

  DpEvent: ``SelfComposed(PoissonSampled(q, Gaussian(noise_multiplier)),
  ceil(num_steps / num_bands))``.

  Attributes:
    noise_multiplier: σ, the noise standard deviation in units of the clip norm.
    sampling_prob: q, the Poisson rate within the step's group.
    num_steps: T, the steps run.
    num_bands: b, the bands of C and the number of groups.

  Privacy guarantee:
    (ε, δ)-DP for adding or removing one example, with ε =
    ``accounting.epsilon(self, delta=δ)``: DP-SGD's with rate q and noise
    multiplier σ over ``ceil(num_steps / num_bands)`` steps.
  """

  kind: ClassVar[str] = "amplified_banded_matrix_mechanism"
  noise_multiplier: float
  sampling_prob: float
  num_steps: int
  num_bands: int

  def __post_init__(self):
    object.__setattr__(self, "noise_multiplier",
                       check.noise_multiplier("noise_multiplier", self.noise_multiplier))
    object.__setattr__(self, "sampling_prob",
                       check.probability("sampling_prob", self.sampling_prob))
    object.__setattr__(self, "num_steps", check.num_steps("num_steps", self.num_steps))
    object.__setattr__(self, "num_bands", check.positive_int("num_bands", self.num_bands))

  @property
  def participations(self) -> int:
    """The most steps any single example can be sampled in, ``ceil(num_steps / num_bands)``."""
    return math.ceil(self.num_steps / self.num_bands)

  def dp_event(self):
    return poisson_gaussian_event(self.noise_multiplier, self.sampling_prob, self.participations)
