"""Descriptions of what a private training run did, one frozen value each.

A mechanism description is all the accountant needs: the noise multiplier, the
sampling scheme and rate, the unit of privacy, and the number of steps. Each
class states its exact mathematical mechanism in its docstring (the privacy
argument fits on one screen) and converts to a ``dp_accounting.DpEvent``.

Conventions shared by every class:

* Sensitivities are in units of the clip norm ``C``: a unit's (example's or
  user's) clipped contribution to the released sum has L2 norm ``<= C`` and the
  noise added to the sum is ``N(0, (noise_multiplier * C)^2 I)``. The noise
  multiplier is therefore the ratio of noise standard deviation to
  sensitivity, as in dp-accounting.
* Neighbouring datasets differ by adding or removing one *privacy unit*: one
  example (``privacy_unit == "example"``) or all the examples of one user
  (``privacy_unit == "user"``).
* ``num_steps`` counts released noisy sums.

This module never imports dp-accounting at import time (``dpfl --help`` must
not pay for it); ``dp_event()`` imports it when called.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from typing import Any, ClassVar

from accounting import validate as check

_REGISTRY: dict[str, type["Mechanism"]] = {}


def register(cls):
  """Class decorator: makes a mechanism type loadable by ``from_dict`` under its ``kind``."""
  _REGISTRY[cls.kind] = cls
  return cls


def binomial_pmf(num_trials: int, success_prob: float) -> list[float]:
  """P[Binomial(num_trials, success_prob) = j] for j = 0..num_trials.

  Computed in log space (``scipy.stats.binom.logpmf``, vectorised) so it
  neither overflows for large ``num_trials`` nor loses the tiny upper-tail
  masses that dominate the privacy loss of the ELS mixture. Weights below the
  smallest double (~1e-308) are exactly 0.
  """
  return list(_binomial_pmf(int(num_trials), float(success_prob)))


@functools.lru_cache(maxsize=32)
def _binomial_pmf(num_trials: int, success_prob: float) -> tuple[float, ...]:
  import numpy as np
  from scipy import stats
  if success_prob >= 1.0:
    return (0.0,) * num_trials + (1.0,)
  j = np.arange(num_trials + 1)
  return tuple(np.exp(stats.binom.logpmf(j, num_trials, success_prob)).tolist())


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """Base class: a serialisable description of a privatized computation."""

  kind: ClassVar[str] = ""
  privacy_unit: ClassVar[str] = "example"
  # Set by classes whose event only dp-accounting's PLD accountant supports.
  pld_only: ClassVar[bool] = False

  def dp_event(self):
    """The dp-accounting ``DpEvent`` of the whole mechanism (all steps)."""
    raise NotImplementedError

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict; ``from_dict`` inverts it exactly."""
    out: dict[str, Any] = {"type": self.kind}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, tuple) and value and isinstance(value[0], Mechanism):
        value = [m.to_dict() for m in value]
      out[f.name] = value
    return out

  def with_steps(self, num_steps: int) -> "Mechanism":
    """The same mechanism run for a different number of steps."""
    return dataclasses.replace(self, num_steps=num_steps)

  def describe(self) -> str:
    """One human-readable line."""
    fields = ", ".join(f"{f.name}={getattr(self, f.name)}"
                       for f in dataclasses.fields(self))
    return f"{self.kind}({fields})"


def from_dict(data: dict[str, Any]) -> Mechanism:
  """Rebuilds a mechanism written by ``Mechanism.to_dict``.

  Args:
    data: a mechanism's ``to_dict()`` (its ``kind`` and fields).

  Returns:
    The mechanism, equal to the one that wrote ``data``.
  """
  if not isinstance(data, dict) or "type" not in data:
    raise ValueError(f"mechanism must be a dict with a 'type' key, got {data!r}")
  kind = data["type"]
  if kind not in _REGISTRY:
    raise ValueError(
        f"mechanism type must be one of {', '.join(sorted(_REGISTRY))}; got {kind!r}")
  kwargs = {k: v for k, v in data.items() if k != "type"}
  if kind == Composed.kind:
    kwargs["phases"] = tuple(from_dict(p) for p in kwargs.get("phases", ()))
  return _REGISTRY[kind](**kwargs)


def poisson_gaussian_event(noise_multiplier: float, sampling_prob: float, num_steps: int):
  """dp-accounting's event for ``num_steps`` Poisson-sampled Gaussians (rate q, noise σ)."""
  import dp_accounting as dpa  # deferred: heavy import
  return dpa.SelfComposedDpEvent(
      dpa.PoissonSampledDpEvent(sampling_prob, dpa.GaussianDpEvent(noise_multiplier)),
      num_steps)


@register
@dataclasses.dataclass(frozen=True)
class PoissonDpSgd(Mechanism):
  """Example-level DP-SGD with Poisson sampling (Abadi et al. 2016).

  Each step includes every example independently with probability
  ``sampling_prob``, sums the included examples' gradients, each clipped to L2
  norm ``C``, and adds ``N(0, (noise_multiplier * C)^2 I)``. Adding or removing
  one example changes the sum by at most ``C``; ``num_steps`` such releases are
  composed adaptively.

  DpEvent: ``SelfComposed(PoissonSampled(q, Gaussian(noise_multiplier)), T)``.

  Attributes:
    noise_multiplier: σ, the noise standard deviation in units of the clip norm.
    sampling_prob: q in (0, 1], each example's probability of taking part in a step.
    num_steps: T, the steps run.

  Privacy guarantee:
    (ε, δ)-DP for adding or removing one example, with ε =
    ``accounting.epsilon(self, delta=δ)`` (PLD by default, an upper bound).
  """

  kind: ClassVar[str] = "poisson_dp_sgd"
  noise_multiplier: float
  sampling_prob: float
  num_steps: int

  def __post_init__(self):
    object.__setattr__(self, "noise_multiplier",
                       check.noise_multiplier("noise_multiplier", self.noise_multiplier))
    object.__setattr__(self, "sampling_prob",
                       check.probability("sampling_prob", self.sampling_prob))
    object.__setattr__(self, "num_steps", check.num_steps("num_steps", self.num_steps))

  def dp_event(self):
    return poisson_gaussian_event(self.noise_multiplier, self.sampling_prob, self.num_steps)


@register
@dataclasses.dataclass(frozen=True)
class UlsDpSgd(PoissonDpSgd):
  """User-level DP-SGD with user-level sampling (ULS; DP-FedAvg).

  Charles et al. 2024, "Fine-Tuning LLMs with User-Level DP". Each step
  includes every *user* independently with probability ``sampling_prob``;
  each included user contributes one vector (the gradient of their mean loss,
  or their model delta after local steps) clipped to L2 norm ``C``; the sum
  gets ``N(0, (noise_multiplier * C)^2 I)``. Adding or removing one user
  changes the sum by at most ``C`` however many examples the user holds, so
  this is DP-SGD over users.

  DpEvent: ``SelfComposed(PoissonSampled(q_user, Gaussian(noise_multiplier)), T)``.

  Attributes:
    noise_multiplier: σ, the noise standard deviation in units of the clip norm.
    sampling_prob: q in (0, 1], each user's probability of taking part in a step.
    num_steps: T, the steps (rounds) run.

  Privacy guarantee:
    (ε, δ)-DP for adding or removing one *user* (all of their examples), with
    ε = ``accounting.epsilon(self, delta=δ)``.
  """

  kind: ClassVar[str] = "uls_dp_sgd"
  privacy_unit: ClassVar[str] = "user"


@register
@dataclasses.dataclass(frozen=True)
class ElsDpSgd(Mechanism):
  """User-level DP from example-level sampling (ELS), Charles et al. 2024.

  Each user holds at most ``examples_per_user`` = k examples. Each step
  includes every example independently with probability ``sampling_prob`` = q,
  clips each included example's gradient to L2 norm ``C``, sums, and adds
  ``N(0, (noise_multiplier * C)^2 I)``. Removing one user removes J of their
  examples from the step's sum, J ~ Binomial(k, q), shifting it by a vector of
  norm at most J*C. One step is therefore dominated by the mixture of
  Gaussians ``N(0, s^2)`` vs ``sum_j Binom(k,q)(j) N(j, s^2)`` with
  ``s = noise_multiplier`` (sensitivities in units of C): for vector outputs
  the worst case aligns all the sensitivity vectors, so their norms suffice
  (Cor. 4.7 of arXiv 2310.15526). A user with fewer than k examples has a
  stochastically smaller J and so no larger privacy loss.

  DpEvent: ``SelfComposed(MixtureOfGaussians(s, [0..k], Binom(k, q)), T)``;
  dp-accounting supports it with the PLD accountant only.

  Attributes:
    noise_multiplier: σ, the noise standard deviation in units of the clip norm.
    sampling_prob: q in (0, 1], each example's probability of taking part in a step.
    num_steps: T, the steps run.
    examples_per_user: k, the most examples any user holds (the cap).

  Privacy guarantee:
    (ε, δ)-DP for adding or removing one *user* holding at most k examples,
    with ε = ``accounting.epsilon(self, delta=δ)`` (PLD only).
  """

  kind: ClassVar[str] = "els_dp_sgd"
  privacy_unit: ClassVar[str] = "user"
  pld_only: ClassVar[bool] = True
  noise_multiplier: float
  sampling_prob: float
  num_steps: int
  examples_per_user: int

  def __post_init__(self):
    object.__setattr__(self, "noise_multiplier",
                       check.noise_multiplier("noise_multiplier", self.noise_multiplier))
    object.__setattr__(self, "sampling_prob",
                       check.probability("sampling_prob", self.sampling_prob))
    object.__setattr__(self, "num_steps", check.num_steps("num_steps", self.num_steps))
    object.__setattr__(self, "examples_per_user",
                       check.positive_int("examples_per_user", self.examples_per_user))

  def mixture(self) -> tuple[list[float], list[float]]:
    """(sensitivities j in units of C, their Binomial(k, q) probabilities).

    Every j in 0..k whose weight is representable (> 0 in double precision);
    the rest, each below ~1e-308 and together below k·1e-308, would be dropped
    by dp-accounting's mixture anyway (it keeps non-zero weights only), and the
    per-step δ they could hide is far below the PLD's own tail mass (~1e-15).
    Dropping them here keeps the event small for large k (k = 10^6, q = 0.01
    has ~7,000 such j, not 10^6).
    """
    probs = binomial_pmf(self.examples_per_user, self.sampling_prob)
    kept = [(float(j), p) for j, p in enumerate(probs) if p > 0.0]
    sens, weights = [j for j, _ in kept], [p for _, p in kept]
    # Round-off leaves the weights summing to 1 ± ~1e-9 for k ~ 10^6 (and
    # dp-accounting insists on 1 to 1e-9). Fix the sum pessimistically: a
    # deficit goes to the largest j, an excess comes off the smallest j; both
    # make J stochastically larger, which never lowers ε.
    gap = 1.0 - math.fsum(weights)
    if gap > 0:
      weights[-1] += gap
    i = 0
    while gap < 0 and i < len(weights):
      take = min(weights[i], -gap)
      weights[i] -= take
      gap += take
      i += 1
    return sens, weights

  def dp_event(self):
    from dp_accounting import dp_event as dpe
    if self.sampling_prob >= 1.0:
      # Every example is in every step: a Gaussian with sensitivity k (units
      # of C), i.e. noise multiplier σ/k. (dp-accounting's mixture PLD fails
      # on a single point mass, so it is stated exactly instead.)
      return dpe.SelfComposedDpEvent(
          dpe.GaussianDpEvent(self.noise_multiplier / self.examples_per_user), self.num_steps)
    sensitivities, probs = self.mixture()
    return dpe.SelfComposedDpEvent(
        dpe.MixtureOfGaussiansDpEvent(self.noise_multiplier, sensitivities, probs),
        self.num_steps)


@register
@dataclasses.dataclass(frozen=True)
class ShuffledDpSgd(Mechanism):
  """Example-level DP-SGD on fixed-size batches from shuffling — no amplification.

  Each epoch shuffles the ``dataset_size`` examples and cuts them into
  ``dataset_size // batch_size`` batches of exactly ``batch_size`` (the
  remainder is dropped). Each batch's sum of per-example gradients, clipped to
  ``C``, gets ``N(0, (noise_multiplier * C)^2 I)``.

  Honest accounting: shuffling is *not* Poisson sampling, and using a Poisson
  accountant for shuffled batches under-reports ε (Chua et al. 2024, "How
  Private are DP-SGD Implementations?"). We claim no amplification: within an
  epoch an example lands in exactly one batch (parallel composition over the
  data-independent partition), so the example's privacy loss is that of one
  Gaussian mechanism with sensitivity C per epoch it takes part in, i.e.
  ``participations = ceil(num_steps / (dataset_size // batch_size))`` composed
  Gaussians. Neighbouring relation: zero-out (one example replaced by one
  contributing nothing), which keeps batch shapes fixed and gives sensitivity
  C; its ε coincides with add/remove-one for the Gaussian mechanism.

  DpEvent: ``SelfComposed(Gaussian(noise_multiplier), participations)``.

  Attributes:
    noise_multiplier: σ, the noise standard deviation in units of the clip norm.
    dataset_size: N, the examples shuffled each epoch.
    batch_size: B, the fixed size of every batch.
    num_steps: T, the steps run.

  Privacy guarantee:
    (ε, δ)-DP for replacing one example by one that contributes nothing
    (zero-out), with ε = ``accounting.epsilon(self, delta=δ)``: no
    amplification by shuffling is claimed.
  """

  kind: ClassVar[str] = "shuffled_dp_sgd"
  noise_multiplier: float
  dataset_size: int
  batch_size: int
  num_steps: int

  def __post_init__(self):
    object.__setattr__(self, "noise_multiplier",
                       check.noise_multiplier("noise_multiplier", self.noise_multiplier))
    object.__setattr__(self, "dataset_size",
                       check.positive_int("dataset_size", self.dataset_size))
    object.__setattr__(self, "batch_size", check.positive_int("batch_size", self.batch_size))
    object.__setattr__(self, "num_steps", check.num_steps("num_steps", self.num_steps))
    if self.batch_size > self.dataset_size:
      raise ValueError(f"batch_size must be <= dataset_size ({self.dataset_size}), "
                       f"got {self.batch_size}")

  @property
  def participations(self) -> int:
    """Most steps any single example can take part in."""
    return -(-self.num_steps // (self.dataset_size // self.batch_size))

  def dp_event(self):
    import dp_accounting as dpa
    return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(self.noise_multiplier),
                                   self.participations)


@register
@dataclasses.dataclass(frozen=True)
class TruncatedPoissonDpSgd(Mechanism):
  """Example-level DP-SGD with Poisson sampling truncated to a maximum batch.

  Static shapes under ``jit`` need a maximum batch size. Each step draws a
  Poisson sample with rate ``sampling_prob`` from ``dataset_size`` examples;
  if it holds more than ``max_batch_size`` examples, a uniformly random subset
  of ``max_batch_size`` of them is kept. The kept examples' clipped gradients
  (norm <= C) are summed and ``N(0, (noise_multiplier * C)^2 I)`` is added.
  The truncation is accounted, not ignored: dp-accounting's
  ``TruncatedSubsampledGaussianDpEvent`` (arXiv 2508.15089; PLD only).

  DpEvent: ``SelfComposed(TruncatedSubsampledGaussian(N, q, B_max, s), T)``.

  Attributes:
    noise_multiplier: σ, the noise standard deviation in units of the clip norm.
    sampling_prob: q in (0, 1], the Poisson rate before truncation.
    dataset_size: N, the examples sampled from.
    max_batch_size: B_max, the most examples a step keeps.
    num_steps: T, the steps run.

  Privacy guarantee:
    (ε, δ)-DP for adding or removing one example, with ε =
    ``accounting.epsilon(self, delta=δ)`` (PLD only), truncation included.
  """

  kind: ClassVar[str] = "truncated_poisson_dp_sgd"
  pld_only: ClassVar[bool] = True
  noise_multiplier: float
  sampling_prob: float
  dataset_size: int
  max_batch_size: int
  num_steps: int

  def __post_init__(self):
    object.__setattr__(self, "noise_multiplier",
                       check.noise_multiplier("noise_multiplier", self.noise_multiplier))
    object.__setattr__(self, "sampling_prob",
                       check.probability("sampling_prob", self.sampling_prob))
    object.__setattr__(self, "dataset_size",
                       check.positive_int("dataset_size", self.dataset_size))
    object.__setattr__(self, "max_batch_size",
                       check.positive_int("max_batch_size", self.max_batch_size))
    object.__setattr__(self, "num_steps", check.num_steps("num_steps", self.num_steps))

  def dp_event(self):
    import dp_accounting as dpa
    return dpa.SelfComposedDpEvent(
        dpa.TruncatedSubsampledGaussianDpEvent(
            dataset_size=self.dataset_size, sampling_probability=self.sampling_prob,
            truncated_batch_size=self.max_batch_size,
            noise_multiplier=self.noise_multiplier),
        self.num_steps)


@register
@dataclasses.dataclass(frozen=True)
class Composed(Mechanism):
  """Phases run one after another (σ, q or the scheme changing in training).

  Adaptive sequential composition of the phases' mechanisms. All phases must
  protect the same privacy unit; their ε is not comparable otherwise.

  DpEvent: ``Composed([phase.dp_event() for phase in phases])``.

  Attributes:
    phases: the mechanisms run one after another, all of one privacy unit.

  Privacy guarantee:
    (ε, δ)-DP for the phases' common privacy unit, with ε =
    ``accounting.epsilon(self, delta=δ)`` of the composition (never less than
    any phase's own ε).
  """

  kind: ClassVar[str] = "composed"
  phases: tuple[Mechanism, ...]

  def __post_init__(self):
    phases = tuple(self.phases)
    if not phases or not all(isinstance(p, Mechanism) for p in phases):
      raise ValueError("phases must be a non-empty sequence of Mechanism values, "
                       f"got {self.phases!r}")
    units = {p.privacy_unit for p in phases}
    if len(units) > 1:
      raise ValueError(f"phases must all protect the same privacy unit, got {sorted(units)}")
    object.__setattr__(self, "phases", phases)

  @property
  def privacy_unit(self) -> str:  # type: ignore[override]
    return self.phases[0].privacy_unit

  @property
  def pld_only(self) -> bool:  # type: ignore[override]
    return any(p.pld_only for p in self.phases)

  @property
  def num_steps(self) -> int:
    return sum(p.num_steps for p in self.phases)

  def with_steps(self, num_steps):
    raise TypeError("a Composed mechanism has per-phase step counts; change a phase")

  def dp_event(self):
    import dp_accounting as dpa
    return dpa.ComposedDpEvent([p.dp_event() for p in self.phases])

  def describe(self) -> str:
    return " then ".join(p.describe() for p in self.phases)


def flatten(mechanism: Mechanism) -> list[Mechanism]:
  """The non-composed phases of a mechanism, in order."""
  if isinstance(mechanism, Composed):
    out: list[Mechanism] = []
    for p in mechanism.phases:
      out.extend(flatten(p))
    return out
  return [mechanism]


def sampling_from_epochs(*, dataset_size: int, batch_size: int, epochs: float,
                         scheme: str = "poisson") -> tuple[float, int]:
  """(sampling_prob, num_steps) for ``epochs`` passes over the data.

  ``scheme="poisson"``: an expected batch of ``batch_size``, q = B / N and
  T = ceil(epochs * N / B), the smallest number of steps that processes
  ``epochs`` passes in expectation (rounding up never under-reports ε).

  ``scheme="shuffle"``: an epoch of shuffled fixed-size batches is
  ``N // B`` full batches (the remainder is dropped, as ``ShuffledDpSgd`` and
  dpfl's ``ShuffledSampler`` do), so T = ceil(epochs * (N // B)); counting
  ceil(N / B) per epoch would add a participation per epoch that never ran.

  Args:
    dataset_size: N, examples (or users) in the data.
    batch_size: B, the (expected) batch size.
    epochs: passes over the data, > 0.
    scheme: ``"poisson"`` or ``"shuffle"``.

  Returns:
    ``(sampling_prob, num_steps)``.
  """
  dataset_size = check.positive_int("dataset_size", dataset_size)
  batch_size = check.positive_int("batch_size", batch_size)
  given_epochs, epochs = epochs, check.positive("epochs", epochs)
  check.choice("scheme", scheme, ("poisson", "shuffle"))
  if batch_size > dataset_size:
    raise ValueError(f"batch_size must be <= dataset_size ({dataset_size}), got {batch_size}")
  # Exact rational arithmetic: float round-off must not drop a step.
  per_epoch = (fractions.Fraction(dataset_size, batch_size) if scheme == "poisson"
               else dataset_size // batch_size)
  steps = math.ceil(fractions.Fraction(str(epochs)) * per_epoch)
  return batch_size / dataset_size, check.num_steps(f"num_steps (from epochs={given_epochs!r})",
                                                    max(1, steps))
