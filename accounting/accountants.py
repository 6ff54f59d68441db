"""ε(δ) and δ(ε) of a mechanism description, with dp-accounting's PLD or RDP.

Both back ends are dp-accounting's own; what this module adds is speed
without optimism:

* **Caching one-step PLDs.** A run's mechanism is a few phases of T identical
  steps. The one-step privacy loss distribution (PLD) of each phase is built
  once per discretisation and cached; composing it T times is an FFT. So ε at
  every training step, or a search over the number of steps, costs one
  composition, not one construction.
* **A vectorised mixture-of-Gaussians PLD** (``_fast_mog``): the same
  distribution dp-accounting builds, value for value, ~10x faster.
* **Choosing the discretisation from the required accuracy.** dp-accounting's
  PLD rounds privacy losses *pessimistically* onto a grid of width Δ, so every
  Δ gives an upper bound on the true ε; a finer grid is tighter and slower.
  For events whose fine-grid construction is slow (the ELS mixture of
  Gaussians takes ~70 s at Δ = 1e-4), ``discretization="auto"`` halves Δ from
  a coarse start until two successive ε agree to ``rtol`` and returns the
  finer one: still a pessimistic upper bound, within ``rtol`` of the limit
  (the error shrinks at least linearly in Δ).
  For the Gaussian family the default is dp-accounting's own Δ = 1e-4, so
  ``dpfl epsilon`` prints the number dp-accounting prints.
* **A floor on Δ for tiny noise.** A one-step PLD spans privacy losses up to
  about s²/(2σ²) + 10·s/σ (sensitivity s, noise σ); at Δ = 1e-4 and σ = 1e-3
  that is 10¹⁰ grid points (dp-accounting runs out of memory; at σ = 0.03 it
  takes minutes). Δ is therefore never finer than span / ``MAX_GRID_POINTS``.
  Any Δ is pessimistic, so this only loosens ε where it is in the hundreds
  or more (σ below ~0.1); the Δ used is reported. For a mixture of Gaussians
  (ELS) the span is dp-accounting's own connect-the-dots range, not the
  worst-case k²/(2σ²): the binomial mass at large j is negligible there.
  Its construction also costs (grid points) x (components), so Δ is never
  finer than span x components / ``MAX_MIXTURE_WORK`` either.
* **A floor on Δ for long runs.** Composing T steps is one FFT over the
  support of the T-fold PLD, whose width grows with T (about 3·10⁸ points
  at Δ = 1e-4 for σ = 1, q = 0.01, T = 10¹²: terabytes). Δ is also never
  finer than that width / ``MAX_COMPOSED_POINTS``, which keeps a query under
  ~1 GiB; again pessimistic, and reported.
* **A ceiling on Δ.** Where even the floor exceeds ``MAX_DISCRETIZATION``
  (noise so small that ε is in the hundreds of thousands), the PLD cannot
  represent the loss; ``epsilon``/``delta`` raise ``ValueError`` naming the
  smallest noise multiplier the PLD accepts there. RDP has no such limit.

Neighbouring relation: add or remove one privacy unit, both directions
(dp-accounting's ``ADD_OR_REMOVE_ONE``; the PLD keeps both the remove and the
add distribution and reports the worse).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

from accounting import validate as check
from accounting.mechanisms import Mechanism

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS = ("pld", "rdp")
# dp-accounting's default value_discretization_interval.
DEFAULT_DISCRETIZATION = 1e-4
# Where "auto" starts, and the finest grid it will go to.
AUTO_START_DISCRETIZATION = 1e-2
AUTO_RTOL = 1e-3
# The most grid points a one-step PLD may need (see "A floor on Δ" above).
MAX_GRID_POINTS = 300_000
# The most points the T-fold composition may span (see "A floor on Δ for long runs").
MAX_COMPOSED_POINTS = 2**23
# dp-accounting's tail bound for self-composition.
_TAIL_MASS_TRUNCATION = 1e-15
# The most (grid points x mixture components) one mixture-of-Gaussians PLD may
# cost (see _mixture_work_floor); ~5 s.
MAX_MIXTURE_WORK = 4_000_000
# The coarsest grid worth computing: beyond it the PLD is refused (see module).
MAX_DISCRETIZATION = 10.0


def _base_events(event, count: int = 1):
  """Flattens a DpEvent into (base event, count) pairs, composition order kept."""
  from dp_accounting import dp_event as dpe
  if isinstance(event, dpe.SelfComposedDpEvent):
    return _base_events(event.event, count * event.count)
  if isinstance(event, dpe.ComposedDpEvent):
    return [pair for e in event.events for pair in _base_events(e, count)]
  if isinstance(event, dpe.NoOpDpEvent):
    return []
  return [(event, count)]


_ONE_STEP_CACHE: dict[tuple[str, float], object] = {}
_ONE_STEP_CACHE_SIZE = 64


def _one_step_pld(event, discretization: float):
  """dp-accounting's PLD of one application of ``event``, cached by value.

  Built exactly as ``PLDAccountant`` builds it, so the composed result is the
  same number dp-accounting reports. (DpEvents holding lists are unhashable,
  so the key is their repr, which spells every field.)
  """
  key = (repr(event), discretization)
  if key not in _ONE_STEP_CACHE:
    if len(_ONE_STEP_CACHE) >= _ONE_STEP_CACHE_SIZE:
      _ONE_STEP_CACHE.pop(next(iter(_ONE_STEP_CACHE)))
    _ONE_STEP_CACHE[key] = _build_one_step_pld(event, discretization)
  return _ONE_STEP_CACHE[key]


def _build_one_step_pld(event, discretization: float):
  from dp_accounting import dp_event as dpe
  from dp_accounting.pld import privacy_loss_distribution as pld
  if isinstance(event, dpe.PoissonSampledDpEvent):
    if not isinstance(event.event, dpe.GaussianDpEvent):
      raise ValueError(f"unsupported sub-event of Poisson sampling: {event.event}")
    return pld.from_gaussian_mechanism(
        standard_deviation=event.event.noise_multiplier,
        value_discretization_interval=discretization,
        sampling_prob=event.sampling_probability)
  if isinstance(event, dpe.MixtureOfGaussiansDpEvent):
    from accounting import _fast_mog  # same PLD, vectorised inverse (see module)
    return _fast_mog.from_mixture_gaussian_mechanism(
        standard_deviation=event.standard_deviation,
        sensitivities=event.sensitivities, sampling_probs=event.sampling_probs,
        value_discretization_interval=discretization)
  if isinstance(event, dpe.TruncatedSubsampledGaussianDpEvent):
    return pld.from_truncated_subsampled_gaussian_mechanism(
        dataset_size=event.dataset_size,
        sampling_probability=event.sampling_probability,
        truncated_batch_size=event.truncated_batch_size,
        noise_multiplier=event.noise_multiplier,
        value_discretization_interval=discretization)
  raise ValueError(f"the PLD back end does not support {type(event).__name__}")


@functools.lru_cache(maxsize=4)
def _composed_pld(mechanism: Mechanism, discretization: float):
  # Cached (a few, they can be ~100 MiB): a δ(ε) search such as group
  # privacy's queries one composition many times through ``delta``.
  from dp_accounting import dp_event as dpe
  from dp_accounting.pld import privacy_loss_distribution as pld
  total = pld.identity(value_discretization_interval=discretization)
  for event, count in _base_events(mechanism.dp_event()):
    if isinstance(event, dpe.GaussianDpEvent):
      # T Gaussians compose exactly into one with σ/√T (as PLDAccountant does).
      step = pld.from_gaussian_mechanism(
          standard_deviation=event.noise_multiplier / math.sqrt(count),
          value_discretization_interval=discretization)
    else:
      step = _self_composed(_one_step_pld(event, discretization), count)
    total = total.compose(step)
  return total


def _self_composed(one_step, count: int):
  """``one_step.self_compose(count)``, always by one FFT.

  dp-accounting keeps a coarse-grid PLD sparse and then composes it by
  ``count`` pairwise compositions (a one-point PMF) or first evaluates
  ``size ** count`` (a huge integer for ``count`` ~ 1e8): both hang. The dense
  form composes by FFT whatever the count.
  """
  from dp_accounting.pld import privacy_loss_distribution as pld
  if count > 1:
    # pylint: disable=protected-access
    remove = one_step._pmf_remove.to_dense_pmf()
    add = None if one_step._symmetric else one_step._pmf_add.to_dense_pmf()
    one_step = pld.PrivacyLossDistribution(remove, add)
  return one_step.self_compose(count, tail_mass_truncation=_TAIL_MASS_TRUNCATION)


def _loss_span(event, count: int) -> float:
  """About the width of the privacy-loss range of one ``event`` (see module)."""
  from dp_accounting import dp_event as dpe
  if isinstance(event, dpe.MixtureOfGaussiansDpEvent):
    return _mixture_loss_span(event.standard_deviation, tuple(event.sensitivities),
                              tuple(event.sampling_probs))
  if isinstance(event, dpe.GaussianDpEvent):  # composed exactly: σ/√count
    sens, sigma = 1.0, event.noise_multiplier / math.sqrt(count)
  elif isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(
      event.event, dpe.GaussianDpEvent):
    sens, sigma = 1.0, event.event.noise_multiplier
  elif isinstance(event, dpe.TruncatedSubsampledGaussianDpEvent):
    sens, sigma = 1.0, event.noise_multiplier
  else:
    return 0.0
  if sigma <= 0:
    return 0.0
  return sens * sens / (2 * sigma * sigma) + 10 * sens / sigma


@functools.lru_cache(maxsize=64)
def _mixture_loss_span(sigma: float, sensitivities: tuple, probs: tuple) -> float:
  """The privacy-loss range dp-accounting's mixture PLD discretises (both directions)."""
  from dp_accounting.pld import privacy_loss_mechanism as plm
  span = 0.0
  for adjacency in (plm.AdjacencyType.REMOVE, plm.AdjacencyType.ADD):
    bounds = plm.MixtureGaussianPrivacyLoss(
        sigma, list(sensitivities), list(probs), pessimistic_estimate=True,
        log_mass_truncation_bound=-50, adjacency_type=adjacency).connect_dots_bounds()
    span = max(span, float(bounds.epsilon_upper - bounds.epsilon_lower))
  return span


def _mixture_work_floor(event) -> float:
  """Δ at which a mixture PLD's construction stays within ``MAX_MIXTURE_WORK``.

  Its cost is (grid points) x (components) x (bisection depth): k = 1000,
  q = 0.5 took a minute at 53,000 points; ELS with k = 8 at Δ = 1e-4 is ~10^5.
  """
  from dp_accounting import dp_event as dpe
  if not isinstance(event, dpe.MixtureOfGaussiansDpEvent):
    return 0.0
  components = sum(1 for p in event.sampling_probs if p > 0)
  span = _mixture_loss_span(event.standard_deviation, tuple(event.sensitivities),
                            tuple(event.sampling_probs))
  return float(span * components / MAX_MIXTURE_WORK)


def _composed_width(event, count: int, span_floor: float) -> float:
  """About the privacy-loss width of the ``count``-fold composition of ``event``.

  Measured on the one-step PLD at a coarse grid (the width in loss units hardly
  depends on Δ) with dp-accounting's own self-composition bounds.
  """
  from dp_accounting import dp_event as dpe
  from dp_accounting.pld import common
  if isinstance(event, dpe.GaussianDpEvent) or count <= 1:
    return 0.0  # composed exactly (or not at all): the span floor covers it
  disc = max(AUTO_START_DISCRETIZATION, span_floor)
  if disc > MAX_DISCRETIZATION:
    return 0.0  # refused before composing (see _check_floor)
  one_step = _one_step_pld(event, disc)
  width = 0
  for pmf in (one_step._pmf_remove, one_step._pmf_add):  # pylint: disable=protected-access
    probs = pmf.to_dense_pmf()._probs  # pylint: disable=protected-access
    lower, upper = common.compute_self_convolve_bounds(probs, count, _TAIL_MASS_TRUNCATION)
    width = max(width, upper - lower + 1)
  return width * disc


@functools.lru_cache(maxsize=256)
def discretization_floor(mechanism: Mechanism) -> float:
  """The finest Δ the PLD back end uses for ``mechanism`` (0: no floor).

  The largest of: the widest one-step loss range / ``MAX_GRID_POINTS``, a
  mixture's span x components / ``MAX_MIXTURE_WORK``, and the composed width
  of all phases / ``MAX_COMPOSED_POINTS`` (see module).
  """
  pairs = _base_events(mechanism.dp_event())
  span_floor = _span_floor(mechanism)
  # 1.25: the width at the chosen Δ may exceed the estimate from the coarse grid.
  composed = 1.25 * sum(_composed_width(e, c, span_floor) for e, c in pairs)
  return max(span_floor, composed / MAX_COMPOSED_POINTS)


def _scaled_noise(mechanism: Mechanism, factor: float) -> Mechanism:
  """``mechanism`` with every noise multiplier multiplied by ``factor``."""
  import dataclasses
  from accounting.mechanisms import Composed
  if isinstance(mechanism, Composed):
    return Composed(tuple(_scaled_noise(p, factor) for p in mechanism.phases))
  return dataclasses.replace(mechanism,
                             noise_multiplier=mechanism.noise_multiplier * factor)


def _span_floor(mechanism: Mechanism) -> float:
  """The one-step part of the floor: grid points and mixture work (see module)."""
  pairs = _base_events(mechanism.dp_event())
  return max([_loss_span(e, c) / MAX_GRID_POINTS for e, c in pairs]
             + [_mixture_work_floor(e) for e, _ in pairs], default=0.0)


def _check_floor(mechanism: Mechanism, floor: float) -> None:
  """Refuses noise too small for the PLD, naming the smallest noise it accepts."""
  if floor <= MAX_DISCRETIZATION:
    return
  sigma = getattr(mechanism, "noise_multiplier", None)
  if _span_floor(mechanism) <= MAX_DISCRETIZATION:  # too many steps for so little noise
    raise ValueError(
        f"noise_multiplier={sigma} over num_steps={mechanism.num_steps} is beyond the PLD "
        "back end's range (ε is in the hundreds of thousands or more): use more noise "
        "or fewer steps" + ("" if mechanism.pld_only else
                            ", or accountant='rdp' for an upper bound"))
  lo, hi = 1.0, 2.0  # noise scale factors: lo refused, hi accepted
  while _span_floor(_scaled_noise(mechanism, hi)) > MAX_DISCRETIZATION:
    lo, hi = hi, hi * 2
  for _ in range(20):
    mid = math.sqrt(lo * hi)
    if _span_floor(_scaled_noise(mechanism, mid)) > MAX_DISCRETIZATION:
      lo = mid
    else:
      hi = mid
  if sigma is None:
    need = f"every phase's noise_multiplier multiplied by >= {hi:.4g}"
  else:
    need = f"noise_multiplier >= {sigma * hi:.4g}, got {sigma:g}"
  rdp = ("" if mechanism.pld_only else
         "; accountant='rdp' gives an upper bound at any noise")
  raise ValueError(
      f"noise too small for the PLD back end: it needs {need} (below that the privacy "
      f"loss outgrows the coarsest grid, Δ = {MAX_DISCRETIZATION:g}, and ε is in the "
      f"thousands or more){rdp}")


def _needs_auto(mechanism: Mechanism) -> bool:
  from dp_accounting import dp_event as dpe
  return any(isinstance(e, dpe.MixtureOfGaussiansDpEvent)
             for e, _ in _base_events(mechanism.dp_event()))


def _refine(value_at, *, start: float, rtol: float, finest: float = DEFAULT_DISCRETIZATION):
  """Halves Δ until two successive pessimistic values agree to ``rtol``."""
  disc = start
  previous = value_at(disc)
  while disc / 2 >= finest * (1 - 1e-12):
    disc /= 2
    current = value_at(disc)
    if _agree(previous, current, rtol):
      return current, disc
    previous = current
  return previous, disc


def _agree(previous, current, rtol: float) -> bool:
  """Two successive values (or tuples of them, one per query) agree to ``rtol``."""
  if not isinstance(current, tuple):
    previous, current = (previous,), (current,)
  return all(abs(p - c) <= rtol * abs(c) or c == p for p, c in zip(previous, current))


@functools.lru_cache(maxsize=64)
def _rdp_accountant(mechanism: Mechanism):
  from dp_accounting.rdp import rdp_privacy_accountant as rdp
  if mechanism.pld_only:
    raise ValueError(
        f"accountant must be 'pld' for a {mechanism.kind} mechanism (the RDP back end of "
        "dp-accounting does not support its event)")
  acc = rdp.RdpAccountant()
  acc.compose(mechanism.dp_event())
  return acc


def check_mechanism(mechanism) -> None:
  """Raises ``ValueError`` unless ``mechanism`` is an ``accounting`` mechanism."""
  if not isinstance(mechanism, Mechanism):
    raise ValueError("mechanism must be an accounting Mechanism (e.g. "
                     f"accounting.PoissonDpSgd), got {mechanism!r:.80}")


def resolve_discretization(mechanism: Mechanism, discretization) -> float | str:
  """The Δ a call will use: a float, or ``"auto"`` for the adaptive rule."""
  if discretization is None:
    return "auto" if _needs_auto(mechanism) else DEFAULT_DISCRETIZATION
  if discretization == "auto":
    return "auto"
  return check.positive("value_discretization_interval", discretization)


def epsilon_and_discretization(mechanism: Mechanism, *, delta: float,
                               accountant: Accountant = "pld",
                               discretization: float | str | None = None,
                               rtol: float = AUTO_RTOL) -> tuple[float, float | None]:
  """(ε, the PLD Δ actually used; None for RDP). See ``epsilon``.

  Args:
    mechanism: what was run (``accounting.mechanisms``).
    delta: target δ in (0, 1).
    accountant: ``"pld"`` (tight; default) or ``"rdp"``.
    discretization: PLD grid Δ (see ``epsilon``).
    rtol: relative accuracy of the ``"auto"`` grid rule.

  Returns:
    ``(epsilon, discretization)``: ``epsilon(mechanism, delta=delta, ...)``
    and the PLD grid Δ it was computed on (None for RDP).
  """
  check_mechanism(mechanism)
  delta = check.open_unit("delta", delta)
  check.choice("accountant", accountant, ACCOUNTANTS)
  rtol = check.positive("rtol", rtol)
  if accountant == "pld":
    discretization = resolve_discretization(mechanism, discretization)
  return _cached_epsilon(mechanism, delta, accountant, discretization, rtol)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(mechanism: Mechanism, delta: float, accountant: str, disc, rtol: float):
  # Mechanisms are frozen values, so a repeated query (a training loop logging
  # ε, the CLI and the ledger agreeing) is answered without recomputation.
  if accountant == "rdp":
    return _rdp_accountant(mechanism).get_epsilon(delta), None
  value_at = lambda d: _composed_pld(mechanism, d).get_epsilon_for_delta(delta)
  return _evaluate(value_at, mechanism, disc, rtol)


def _evaluate(value_at, mechanism: Mechanism, disc, rtol: float):
  """(value, Δ used) at ``disc`` ("auto": refined), never finer than the floor."""
  floor = discretization_floor(mechanism)
  _check_floor(mechanism, floor)
  if disc == "auto":
    return _refine(value_at, start=max(AUTO_START_DISCRETIZATION, floor), rtol=rtol,
                   finest=max(DEFAULT_DISCRETIZATION, floor))
  disc = max(disc, floor)
  return value_at(disc), disc


def epsilon(mechanism: Mechanism, *, delta: float, accountant: Accountant = "pld",
            discretization: float | str | None = None, rtol: float = AUTO_RTOL) -> float:
  """The ε of ``mechanism`` at ``delta``: an upper bound, never optimistic.

  Args:
    mechanism: what was run (``accounting.mechanisms``).
    delta: target δ in (0, 1).
    accountant: ``"pld"`` (tight; default) or ``"rdp"`` (looser, fast).
    discretization: PLD grid Δ. ``None``: dp-accounting's 1e-4, or ``"auto"``
      for events whose fine-grid construction is slow (ELS). ``"auto"``: the
      adaptive rule in the module docstring.
    rtol: relative accuracy of the ``"auto"`` rule.

  Returns:
    ε such that the mechanism is (ε, δ)-DP for its privacy unit.
  """
  return epsilon_and_discretization(mechanism, delta=delta, accountant=accountant,
                                    discretization=discretization, rtol=rtol)[0]


def epsilons(mechanism: Mechanism, *, deltas, accountant: Accountant = "pld",
             discretization: float | str | None = None,
             rtol: float = AUTO_RTOL) -> tuple[float, ...]:
  """The ε of ``mechanism`` at each of ``deltas``, from one composed PLD.

  The same numbers as ``epsilon`` at each δ, for the price of one: the PLD
  back end composes the mechanism once (and caches it) and answers every δ
  from it, which is what makes a table over many δ (``dpfl.scaling``'s σ
  grid) affordable. Every value is an upper bound, never optimistic.

  Args:
    mechanism: what was run (``accounting.mechanisms``).
    deltas: the δ values, each in (0, 1) (any order; repeats allowed).
    accountant, discretization, rtol: as in ``epsilon``. All values of one
      call share one grid: under ``"auto"`` Δ is halved until every value
      agrees with the previous grid's to ``rtol``.

  Returns:
    A tuple of ε, one per δ, in the order given.
  """
  check_mechanism(mechanism)
  deltas = tuple(check.open_unit("deltas", d) for d in _as_sequence("deltas", deltas))
  check.choice("accountant", accountant, ACCOUNTANTS)
  rtol = check.positive("rtol", rtol)
  if accountant == "rdp":
    acc = _rdp_accountant(mechanism)
    return tuple(float(acc.get_epsilon(d)) for d in deltas)
  disc = resolve_discretization(mechanism, discretization)
  value_at = lambda d: tuple(float(_composed_pld(mechanism, d).get_epsilon_for_delta(x))
                             for x in deltas)
  return _evaluate(value_at, mechanism, disc, rtol)[0]


def _as_sequence(name: str, values) -> tuple:
  if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
    raise ValueError(f"{name} must be a sequence of numbers, got {values!r:.80}")
  values = tuple(values)
  if not values:
    raise ValueError(f"{name} must hold at least one number, got an empty sequence")
  return values


def delta(mechanism: Mechanism, *, epsilon: float, accountant: Accountant = "pld",
          discretization: float | str | None = None, rtol: float = AUTO_RTOL) -> float:
  """The smallest δ for which ``mechanism`` is (ε, δ)-DP (an upper bound).

  Args:
    mechanism: what was run (``accounting.mechanisms``).
    epsilon: ε ≥ 0.
    accountant: ``"pld"`` (tight; default) or ``"rdp"``.
    discretization: PLD grid Δ (see ``epsilon``).
    rtol: relative accuracy of the ``"auto"`` grid rule.

  Returns:
    δ such that the mechanism is (ε, δ)-DP for its privacy unit.
  """
  check_mechanism(mechanism)
  epsilon = check.non_negative("epsilon", epsilon)
  check.choice("accountant", accountant, ACCOUNTANTS)
  rtol = check.positive("rtol", rtol)
  if accountant == "rdp":
    return _rdp_accountant(mechanism).get_delta(epsilon)
  disc = resolve_discretization(mechanism, discretization)
  value_at = lambda d: _composed_pld(mechanism, d).get_delta_for_epsilon(epsilon)
  return _evaluate(value_at, mechanism, disc, rtol)[0]
