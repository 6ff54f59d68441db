"""The plan of a private run: the one place a configuration becomes a mechanism.

A ``PrivacyPlan`` is a frozen, JSON-serialisable description of a private
run — what it protects (the privacy unit), how it samples, how it clips, how
it noises (DP-SGD's independent noise is the ``"identity"`` strategy; DP-FTRL
names a matrix factorization), which accountant and δ report it, the target ε
if any, and the planned number of steps. ``PrivacyPlan.mechanism(num_steps)``
is the ONLY mapping from a configuration to an ``accounting`` mechanism: the
training loop (``dpfl.make_private``, every privacy unit and strategy), the
ledger, a resumed run and the command line (``dpfl epsilon``, ``dpfl
calibrate``, ``dpfl mf``) all ask the plan, so they cannot disagree about ε.

``plan_run(...)`` is the one planner: it validates the configuration, turns
epochs into steps, and calibrates σ for a target ε (for the whole planned run,
composed after any earlier ledger entries). It is JAX-free; training code
that needs a matrix factorization builds the strategy for
``SamplingPlan.participation(num_steps)`` and passes its numbers in as a
``NoisePlan``.

Mapping (sampling scheme × noise × units → mechanism):

=================  ==========  ======================  ==============================
scheme             noise       units (privacy/sample)  mechanism
=================  ==========  ======================  ==============================
poisson            identity    example / example       ``PoissonDpSgd``
truncated_poisson  identity    example / example       ``TruncatedPoissonDpSgd``
poisson            identity    user / user (ULS)       ``UlsDpSgd``
poisson            identity    user / example (ELS)    ``ElsDpSgd`` (cap k)
shuffle            identity    example / example       ``ShuffledDpSgd``
cyclic             any C       example or user         ``(User)MatrixMechanism``
cyclic_poisson     banded C    example / example       ``AmplifiedBandedMatrixMechanism``
=================  ==========  ======================  ==============================
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

from accounting import accountants
from accounting import adaptive as adaptive_clipping
from accounting import calibrate as calib
from accounting import matrix
from accounting import mechanisms as mech
from accounting import validate as check
from accounting.ledger import check_header, parse_json

SCHEMES = ("poisson", "truncated_poisson", "shuffle", "cyclic", "cyclic_poisson")
UNITS = ("example", "user")
_FORMAT = "dpfl-plan"
_VERSION = 1


class BudgetExhaustedError(RuntimeError):
  """A step was asked for that the run's privacy budget does not cover.

  Raised before the step's batch is handed out or its noise drawn. ``spent``
  is the ε already spent by the run (at its δ), ``target`` the target ε (None
  when the run has none and its planned steps are the limit), ``steps`` the
  steps done and ``limit`` the steps the budget allows.
  """

  def __init__(self, message: str, *, spent: float | None = None,
               target: float | None = None, steps: int | None = None,
               limit: int | None = None):
    super().__init__(message)
    self.spent, self.target, self.steps, self.limit = spent, target, steps, limit


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """How each step's units are selected (public facts only; no seed).

  Attributes:
    scheme: one of ``SCHEMES``.
    unit: the sampling unit, ``"example"`` or ``"user"``.
    population_size: N, the number of sampling units (None when only the
      rate is known, e.g. ``dpfl epsilon --sampling-prob`` or ``dpfl mf
      --sampling cyclic-poisson --sampling-prob``).
    sampling_prob: q (Poisson schemes; for ``cyclic_poisson`` the rate within
      the active group).
    batch_size: the fixed batch (shuffle, cyclic) or the expected one.
    max_batch_size: the truncation limit (``truncated_poisson`` only).
    num_groups: the groups of ``cyclic_poisson`` (= the strategy's bands).
    examples_per_user: the cap k (ELS accounts for it; ULS checks datasets).
  """

  scheme: str
  unit: str = "example"
  population_size: int | None = None
  sampling_prob: float | None = None
  batch_size: int | None = None
  max_batch_size: int | None = None
  num_groups: int | None = None
  examples_per_user: int | None = None

  def __post_init__(self):
    check.choice("sampling scheme", self.scheme, SCHEMES)
    check.choice("sampling unit", self.unit, UNITS)
    for name in ("population_size", "batch_size", "max_batch_size", "num_groups",
                 "examples_per_user"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, check.positive_int(name, value))
    if self.sampling_prob is not None:
      object.__setattr__(self, "sampling_prob",
                         check.probability("sampling_prob", self.sampling_prob))
    needs = {"poisson": ("sampling_prob",),
             "truncated_poisson": ("sampling_prob", "population_size", "max_batch_size"),
             "shuffle": ("population_size", "batch_size"),
             "cyclic": ("population_size", "batch_size"),
             # ε needs only the rate and the groups (the run's N is for the batches).
             "cyclic_poisson": ("sampling_prob", "num_groups")}[self.scheme]
    for name in needs:
      if getattr(self, name) is None:
        raise ValueError(f"{name} is required for sampling scheme {self.scheme!r}")
    if (self.batch_size is not None and self.population_size is not None
        and self.scheme in ("shuffle", "cyclic") and self.batch_size > self.population_size):
      raise ValueError(f"batch_size must be in [1, population_size={self.population_size}], "
                       f"got {self.batch_size}")
    if (self.scheme == "cyclic_poisson" and self.population_size is not None
        and self.num_groups > self.population_size):
      raise ValueError(f"num_groups must be <= population_size ({self.population_size}), "
                       f"got {self.num_groups}")

  @property
  def steps_per_epoch(self) -> int | None:
    """The steps of one pass, ``N // B`` (shuffle, cyclic) or the groups (cyclic Poisson)."""
    if self.scheme in ("shuffle", "cyclic"):
      return self.population_size // self.batch_size
    if self.scheme == "cyclic_poisson":
      return self.num_groups
    return None

  @property
  def expected_batch_size(self) -> float:
    """The public normaliser of the noisy sum."""
    if self.scheme in ("shuffle", "cyclic"):
      return float(self.batch_size)
    if self.population_size is None:
      raise ValueError("population_size is needed for the expected batch size")
    if self.scheme == "cyclic_poisson":
      return self.sampling_prob * (self.population_size // self.num_groups)
    return self.sampling_prob * self.population_size

  def participation(self, num_steps: int) -> tuple[int, int]:
    """``(k, b)``: each unit in at most k of ``num_steps`` steps, b apart (fixed orders)."""
    num_steps = check.positive_int("num_steps", num_steps)
    b = self.steps_per_epoch
    if self.scheme not in ("cyclic", "cyclic_poisson"):
      raise ValueError(f"participation applies to the cyclic schemes, not {self.scheme!r}")
    return math.ceil(num_steps / b), b

  def steps_from_epochs(self, epochs: float) -> int:
    """The steps of ``epochs`` passes (rounded up; never fewer than one)."""
    given = epochs
    epochs = check.positive("epochs", epochs)
    if self.scheme == "cyclic":
      # A cyclic epoch is b steps (the N mod B remainder never takes part).
      steps = max(1, math.ceil(round(float(epochs) * self.steps_per_epoch, 9)))
      return check.num_steps(f"num_steps (from epochs={given!r})", steps)
    if self.population_size is None or self.batch_size is None:
      raise ValueError("epochs need population_size and batch_size")
    scheme = "shuffle" if self.scheme == "shuffle" else "poisson"
    # The value as given, so an error names it as the user wrote it.
    return mech.sampling_from_epochs(dataset_size=self.population_size,
                                     batch_size=self.batch_size, epochs=given,
                                     scheme=scheme)[1]


@dataclasses.dataclass(frozen=True)
class NoisePlan:
  """The noise: DP-SGD's independent noise (``"identity"``) or a matrix factorization.

  Attributes:
    strategy: ``"identity"`` (independent noise, no matrix) or the name of C.
    planned_steps: n, the size of C (None for independent noise).
    sensitivity: what the noise is scaled by, in units of the clip norm:
      ``sens(C)`` under the participation, or the largest column norm for
      amplified banded MF; 1 for independent noise.
    max_participations: the participations per unit C's sensitivity was
      computed for.
    min_separation: the least separation of two participations C's
      sensitivity was computed for.
    participation: which patterns: ``"min-sep"`` (every b-separated set) or
      ``"fixed-epoch"`` (one order repeated every b steps;
      ``accounting.matrix.PARTICIPATIONS``).
    amplified: amplified banded MF (cyclic Poisson sampling).
    options: the options the strategy was built with (for the reader and for
      rebuilding it), e.g. ``{"buffers": 4}``.
    fingerprint: a digest of C's entries (so a restored run is checked to
      use the very matrix it was planned with).
  """

  strategy: str = "identity"
  planned_steps: int | None = None
  sensitivity: float = 1.0
  max_participations: int | None = None
  min_separation: int | None = None
  amplified: bool = False
  options: tuple = ()
  fingerprint: str | None = None
  participation: str = "min-sep"

  def __post_init__(self):
    if not isinstance(self.strategy, str) or not self.strategy:
      raise ValueError(f"noise strategy must be a non-empty string, got {self.strategy!r}")
    object.__setattr__(self, "sensitivity", check.positive("sensitivity", self.sensitivity))
    check.choice("participation", self.participation, matrix.PARTICIPATIONS)
    if isinstance(self.options, dict):
      object.__setattr__(self, "options", tuple(sorted(self.options.items())))
    if self.planned_steps is not None:
      object.__setattr__(self, "planned_steps",
                         check.positive_int("planned_steps", self.planned_steps))

  @property
  def is_matrix(self) -> bool:
    return self.planned_steps is not None


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """A private run, planned: the single source of its accounting.

  Attributes:
    privacy_unit: ``"example"`` or ``"user"``: what ε protects.
    sampling: the ``SamplingPlan``.
    noise_multiplier: σ (given, or calibrated for ``target_epsilon``).
    l2_clip_norm: C (per sampling unit: per example for ELS, per user for ULS).
    noise: the ``NoisePlan``.
    delta: δ of the reported ε.
    num_steps: the planned steps: the run's limit unless extended explicitly.
    accountant: ``"pld"`` or ``"rdp"``.
    target_epsilon: the budget, or None.
    clip_method: the clipping back-end (does not affect ε).
    local_steps: ULS local steps per user (None: one gradient).
    adaptive: adaptive (quantile) clipping (``accounting.adaptive.AdaptiveClip``,
      ``count_noise_stddev`` fixed), or None for a fixed C. With it
      ``l2_clip_norm`` is the initial C, ``noise_multiplier`` the gradient
      noise's, and the run is accounted with ``accounted_noise_multiplier``
      (the pair of the sum and the count as one Gaussian mechanism).
  """

  privacy_unit: str
  sampling: SamplingPlan
  noise_multiplier: float
  l2_clip_norm: float
  noise: NoisePlan
  delta: float
  num_steps: int
  accountant: str = "pld"
  target_epsilon: float | None = None
  clip_method: str = "auto"
  local_steps: int | None = None
  adaptive: adaptive_clipping.AdaptiveClip | None = None

  def __post_init__(self):
    check.choice("privacy_unit", self.privacy_unit, UNITS)
    check.choice("accountant", self.accountant, accountants.ACCOUNTANTS)
    if not isinstance(self.clip_method, str) or not self.clip_method:
      # dpfl.clipping validates the name (it owns the list of back-ends).
      raise ValueError(f"clip_method must be a non-empty string, got {self.clip_method!r}")
    object.__setattr__(self, "noise_multiplier",
                       check.noise_multiplier("noise_multiplier", self.noise_multiplier))
    object.__setattr__(self, "l2_clip_norm", check.positive("l2_clip_norm", self.l2_clip_norm))
    object.__setattr__(self, "delta", check.open_unit("delta", self.delta))
    object.__setattr__(self, "num_steps", check.num_steps("num_steps", self.num_steps))
    if self.target_epsilon is not None:
      object.__setattr__(self, "target_epsilon",
                         check.target_epsilon("target_epsilon", self.target_epsilon))
    if self.local_steps is not None:
      object.__setattr__(self, "local_steps", check.positive_int("local_steps",
                                                                 self.local_steps))
    _check_combination(self)

  # --- accounting -----------------------------------------------------------

  def mechanism(self, num_steps: int | None = None) -> mech.Mechanism:
    """The accounting description of the first ``num_steps`` steps (default: all planned).

    This is the only function in dpfl that maps a configuration to a
    mechanism; see the module docstring's table.
    """
    steps = self.num_steps if num_steps is None else check.positive_int("num_steps",
                                                                         num_steps)
    return _mechanism(self, self.accounted_noise_multiplier, steps)

  @property
  def accounted_noise_multiplier(self) -> float:
    """The noise multiplier the mechanism is accounted with; with adaptive clipping, the pair's σ_eff."""
    return _accounted(self, self.noise_multiplier)

  def epsilon(self, num_steps: int | None = None, *, delta: float | None = None) -> float:
    """ε of the first ``num_steps`` steps (default: the planned run) at δ (default: the plan's)."""
    return accountants.epsilon(self.mechanism(num_steps),
                               delta=self.delta if delta is None else delta,
                               accountant=self.accountant)

  @property
  def expected_batch_size(self) -> float:
    return self.sampling.expected_batch_size

  @property
  def noise_stddev(self) -> float:
    """The standard deviation of the noise on the clipped sum, σ · C · sensitivity."""
    return self.noise_multiplier * self.l2_clip_norm * self.noise.sensitivity

  # --- serialisation --------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["noise"]["options"] = dict(self.noise.options)
    if self.adaptive is None:
      del out["adaptive"]  # fixed-C plans serialise as before
    return {"format": _FORMAT, "version": _VERSION, **out}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "PrivacyPlan":
    check_header(data, format=_FORMAT, version=_VERSION, what="plan")
    fields = {f.name for f in dataclasses.fields(cls)}
    body = {k: v for k, v in data.items() if k not in ("format", "version")}
    unknown = sorted(set(body) - fields)
    if unknown:
      raise ValueError(f"unknown plan field(s) {unknown}")
    try:
      body["sampling"] = SamplingPlan(**body["sampling"])
      noise = dict(body["noise"])
      noise["options"] = dict(noise.get("options") or {})
      body["noise"] = NoisePlan(**noise)
      body["adaptive"] = adaptive_clipping.AdaptiveClip.from_dict(body.get("adaptive"))
      return cls(**body)
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a valid dpfl plan: {e}") from None

  @classmethod
  def from_json(cls, text: str) -> "PrivacyPlan":
    return cls.from_dict(parse_json(text))


def _check_combination(plan: PrivacyPlan) -> None:
  s, noise = plan.sampling, plan.noise
  if plan.privacy_unit == "example" and s.unit != "example":
    raise ValueError("an example-level plan samples examples (sampling unit 'example')")
  if s.scheme in ("cyclic", "cyclic_poisson") and not noise.is_matrix:
    raise ValueError(f"sampling scheme {s.scheme!r} is accounted by a matrix mechanism: give "
                     "a noise strategy with planned_steps")
  if noise.is_matrix and s.scheme not in ("cyclic", "cyclic_poisson"):
    raise ValueError(f"a matrix-factorization strategy ({noise.strategy!r}) needs a cyclic "
                     f"sampling scheme, got {s.scheme!r}")
  if s.scheme == "cyclic_poisson" and (plan.privacy_unit != "example" or not noise.amplified):
    raise ValueError("cyclic Poisson sampling is amplified banded MF, example level only")
  if noise.amplified and s.scheme != "cyclic_poisson":
    raise ValueError("amplified banded MF needs sampling scheme 'cyclic_poisson'")
  if s.scheme in ("truncated_poisson", "shuffle") and plan.privacy_unit != "example":
    raise ValueError(f"sampling scheme {s.scheme!r} is for example-level runs")
  if plan.privacy_unit == "user" and s.unit == "example" and s.examples_per_user is None:
    raise ValueError("examples_per_user (the cap k) is required for ELS "
                     "(sampling_unit='example'): its user-level ε depends on k")
  if plan.privacy_unit == "user" and s.unit == "example" and s.scheme != "poisson":
    raise ValueError("ELS (user-level privacy, example sampling) Poisson-samples examples")
  if plan.local_steps is not None and (plan.privacy_unit, s.unit) != ("user", "user"):
    raise ValueError("local_steps apply to ULS (privacy_unit='user', sampling_unit='user')")
  if noise.is_matrix and not noise.amplified and plan.num_steps > noise.planned_steps:
    raise ValueError(f"num_steps ({plan.num_steps}) exceeds the strategy's planned_steps "
                     f"({noise.planned_steps})")
  if plan.adaptive is not None:
    if plan.adaptive.count_noise_stddev is None:
      raise ValueError("adaptive.count_noise_stddev must be fixed in a plan "
                       "(AdaptiveClip.resolved(expected_batch_size))")
    if noise.amplified:
      raise ValueError("adaptive clipping is not supported with amplified banded MF "
                       "(cyclic Poisson sampling): its amplified accounting of the count query "
                       "is not derived; use sampling_scheme='cyclic' or a fixed l2_clip_norm")
    if plan.l2_clip_norm != plan.adaptive.initial:
      raise ValueError(f"l2_clip_norm ({plan.l2_clip_norm!r}) must equal the adaptive "
                       f"clipping's initial C ({plan.adaptive.initial!r})")
  pld_only = (s.scheme == "truncated_poisson"
              or (plan.privacy_unit == "user" and s.unit == "example"))
  if pld_only and plan.accountant != "pld":
    raise ValueError(f"accountant must be 'pld' for this plan ({s.scheme}, "
                     f"{plan.privacy_unit}-level, sampling {s.unit}s): the RDP back end "
                     f"cannot account it; got {plan.accountant!r}")


def _count_participations(plan: PrivacyPlan) -> int:
  """Releases of the count one unit can be in that one Gaussian mechanism covers."""
  return (plan.noise.max_participations or 1) if plan.noise.is_matrix else 1


def _accounted(plan: PrivacyPlan, sigma: float) -> float:
  """σ as accounted: with adaptive clipping, σ_eff of the (sum, count) pair."""
  if plan.adaptive is None:
    return sigma
  return adaptive_clipping.effective_noise_multiplier(
      sigma, plan.adaptive.count_noise_stddev, participations=_count_participations(plan))


def _mechanism(plan: PrivacyPlan, sigma: float, steps: int) -> mech.Mechanism:
  s, noise = plan.sampling, plan.noise
  if noise.amplified:
    return matrix.AmplifiedBandedMatrixMechanism(
        noise_multiplier=sigma, sampling_prob=s.sampling_prob, num_steps=steps,
        num_bands=s.num_groups)
  if noise.is_matrix:
    cls = matrix.UserMatrixMechanism if plan.privacy_unit == "user" else matrix.MatrixMechanism
    k = noise.max_participations or 1
    return cls(noise_multiplier=sigma, sensitivity=noise.sensitivity,
               planned_steps=noise.planned_steps, strategy=noise.strategy,
               max_participations=k, min_separation=noise.min_separation if k > 1 else None,
               num_steps=steps, participation=noise.participation)
  if s.scheme == "shuffle":
    return mech.ShuffledDpSgd(noise_multiplier=sigma, dataset_size=s.population_size,
                              batch_size=s.batch_size, num_steps=steps)
  if s.scheme == "truncated_poisson":
    return mech.TruncatedPoissonDpSgd(noise_multiplier=sigma, sampling_prob=s.sampling_prob,
                                      dataset_size=s.population_size,
                                      max_batch_size=s.max_batch_size, num_steps=steps)
  if plan.privacy_unit == "user":
    if s.unit == "example":
      return mech.ElsDpSgd(noise_multiplier=sigma, sampling_prob=s.sampling_prob,
                           num_steps=steps, examples_per_user=s.examples_per_user)
    return mech.UlsDpSgd(noise_multiplier=sigma, sampling_prob=s.sampling_prob,
                         num_steps=steps)
  return mech.PoissonDpSgd(noise_multiplier=sigma, sampling_prob=s.sampling_prob,
                           num_steps=steps)


def check_noise_or_target(noise_multiplier, target_epsilon) -> None:
  """Exactly one of σ and a target ε (to calibrate σ for) must be given."""
  if (noise_multiplier is None) == (target_epsilon is None):
    raise ValueError("give exactly one of noise_multiplier and target_epsilon, got "
                     f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}")


def run_length(sampling: SamplingPlan, *, num_steps: int | None,
               epochs: float | None) -> int:
  """The run's steps from exactly one of ``num_steps`` and ``epochs`` (passes over the data)."""
  if (num_steps is None) == (epochs is None):
    raise ValueError(f"give exactly one of num_steps and epochs, got num_steps={num_steps!r}, "
                     f"epochs={epochs!r}")
  if num_steps is not None:
    return check.num_steps("num_steps", num_steps)
  return sampling.steps_from_epochs(epochs)


def compose_after(prior: tuple[mech.Mechanism, ...], run: mech.Mechanism) -> mech.Mechanism:
  """``run`` composed after earlier ledger entries (``prior``), as one mechanism."""
  return mech.Composed(tuple(prior) + (run,)) if prior else run


def _check_reachable(probe: PrivacyPlan, prior, target_epsilon: float) -> None:
  """Refuses a target ε the count query alone already exceeds (no gradient noise helps)."""
  limit = adaptive_clipping.count_noise_limit(probe.adaptive.count_noise_stddev,
                                              participations=_count_participations(probe))
  floor = accountants.epsilon(compose_after(prior, _mechanism(probe, limit, probe.num_steps)),
                              delta=probe.delta, accountant=probe.accountant)
  if floor >= target_epsilon:
    raise ValueError(
        f"count_noise_stddev={probe.adaptive.count_noise_stddev:g} is too small for "
        f"target_epsilon={target_epsilon:g}: the noisy count of unclipped units alone spends "
        f"ε={floor:.4g} over the run whatever the gradient noise; raise count_noise_stddev "
        f"(2 * count_noise_stddev must well exceed the calibrated noise multiplier)")


def plan_run(*, privacy_unit: str, sampling: SamplingPlan, l2_clip_norm: float, delta: float,
             num_steps: int | None = None, epochs: float | None = None,
             noise_multiplier: float | None = None, target_epsilon: float | None = None,
             noise: NoisePlan | Callable[[int], NoisePlan] | None = None,
             accountant: str = "pld", clip_method: str = "auto",
             local_steps: int | None = None,
             adaptive: adaptive_clipping.AdaptiveClip | None = None,
             prior: tuple[mech.Mechanism, ...] = ()) -> PrivacyPlan:
  """The one planner: validates, turns epochs into steps, calibrates σ.

  Args:
    privacy_unit: ``"example"`` or ``"user"``.
    sampling: how units are sampled.
    l2_clip_norm: C.
    delta: δ in (0, 1).
    num_steps / epochs: the run's length (exactly one).
    noise_multiplier / target_epsilon: σ, or the ε to calibrate σ for
      (exactly one). Calibration covers the whole planned run composed after
      ``prior`` and never returns a σ whose ε exceeds the target.
    noise: None (independent noise: DP-SGD), a ``NoisePlan``, or a function
      ``num_steps -> NoisePlan`` (a matrix factorization is built for the
      run's steps, which are known only here).
    accountant, clip_method, local_steps: as in ``PrivacyPlan``.
    adaptive: adaptive clipping (``count_noise_stddev`` fixed), or None. With
      a target ε the calibrated σ is the gradient noise's: the pair's σ_eff
      meets the target (``accounting.adaptive``).
    prior: mechanisms already in the ledger the run extends.

  Returns:
    The ``PrivacyPlan``.
  """
  check_noise_or_target(noise_multiplier, target_epsilon)
  check.choice("accountant", accountant, accountants.ACCOUNTANTS)
  delta = check.open_unit("delta", delta)
  if noise_multiplier is not None:
    noise_multiplier = check.noise_multiplier("noise_multiplier", noise_multiplier)
  else:
    target_epsilon = check.target_epsilon("target_epsilon", target_epsilon)
  num_steps = run_length(sampling, num_steps=num_steps, epochs=epochs)
  if noise is None:
    noise = NoisePlan()
  elif callable(noise):
    noise = noise(num_steps)
  base = dict(privacy_unit=privacy_unit, sampling=sampling, l2_clip_norm=l2_clip_norm,
              noise=noise, delta=delta, num_steps=num_steps, accountant=accountant,
              target_epsilon=target_epsilon, clip_method=clip_method, local_steps=local_steps,
              adaptive=adaptive)
  if target_epsilon is not None:
    probe = PrivacyPlan(noise_multiplier=1.0, **base)  # validates before calibrating
    if adaptive is not None:
      _check_reachable(probe, prior, target_epsilon)
    calibration = calib.calibrate_noise_multiplier(
        lambda sigma: compose_after(prior, _mechanism(probe, _accounted(probe, sigma),
                                                      num_steps)),
        target_epsilon=target_epsilon, delta=delta, accountant=accountant)
    noise_multiplier = calibration.value
  plan = PrivacyPlan(noise_multiplier=noise_multiplier, **base)
  accountants.check_mechanism(plan.mechanism())  # σ and steps as the accountant sees them
  return plan
