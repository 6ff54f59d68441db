"""DP-FTRL / DP-MF training through ``make_private``: strategy, sampler, noise, accounting.

``dpfl.make_private(..., strategy="blt")`` (and the user-level
``make_private(..., privacy_unit="user", strategy=...)``, federated DP-FTRL)
replace DP-SGD's independent noise with the correlated noise of a matrix
factorization ``A = B C`` (Denisov et al. 2022, arXiv 2202.08312; Kairouz et
al. 2021, arXiv 2103.00039; Choquette-Choo et al. 2023, arXiv 2211.06530 and
2306.08153). This module makes the three parts agree:

* **Sampling.** ``sampling_scheme="cyclic"`` (the default with a strategy):
  ``dpfl.cyclic_sampling.CyclicSampler`` fixes one order and repeats it every epoch,
  so each unit takes part in at most ``k = ceil(n / b)`` steps exactly ``b``
  (= batches per epoch) apart. ``sampling_scheme="poisson"`` with a banded
  strategy: ``CyclicPoissonSampler`` (amplified banded MF, ``b`` = bands).
* **Strategy.** A name is built for ``n' = k * b`` planned steps (whole
  epochs; a run of ``n <= n'`` steps is a prefix, i.e. post-processing) under
  fixed-epoch participation with period ``b`` (``dpfl.mf.FixedEpoch``: the
  cyclic order is a function of the sampler seed, which the run's state
  carries through save and restore, so unit ``r`` takes part at exactly
  ``r, r + b, ...`` for the whole run) and the chosen workload (prefix sums, or the
  momentum workload with ``momentum=beta``), optimized where the strategy is
  (banded / blt / dense, ``objective``). A ``dpfl.mf`` strategy object may
  be passed instead; it must be for ``n'`` steps, with min-separation
  ``<= b`` or fixed-epoch period ``b``. The ``NoisePlan`` (and so the
  ledger's ``MatrixMechanism``) records which pattern was assumed.
* **Noise and accounting.** ``dpfl.mf.matrix_noise`` streams ``C^{-1} z``
  scaled by ``noise_multiplier * l2_clip_norm * sens``. Cyclic: ``sens`` is
  ``sens(C)`` under ``(k, b)`` and the run is ``accounting.MatrixMechanism``
  (``UserMatrixMechanism`` for users): one Gaussian mechanism with noise
  multiplier ``noise_multiplier``. Amplified banded: ``sens`` is the largest
  column norm (columns normalised to 1) and the run is
  ``accounting.AmplifiedBandedMatrixMechanism`` (DP-SGD with rate ``q`` over
  ``ceil(n / b)`` steps).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from accounting import plan as accounting_plan
from accounting import validate as check

from dpfl.mf.build import NAMES as STRATEGIES
OPTIONS = ("buffers", "bands", "objective", "momentum", "decoder", "restart")
DEFAULT_BUFFERS = 4
DEFAULT_BANDS = 16


@dataclasses.dataclass(frozen=True)
class FtrlPlan:
  """A DP-FTRL run's strategy object and the ``NoisePlan`` that describes it.

  The accounting of the run is the ``PrivacyPlan``'s (``accounting.plan``),
  built from ``noise``; this object only carries the strategy ``C`` the noise
  stream needs.

  Attributes:
    strategy: the ``dpfl.mf`` strategy ``C`` (``planned_steps`` square).
    noise: its ``accounting.plan.NoisePlan`` (sensitivity, participation,
      planned steps, amplified or not).
  """

  strategy: Any
  noise: accounting_plan.NoisePlan

  @property
  def planned_steps(self) -> int:
    return self.noise.planned_steps

  @property
  def participation(self) -> tuple[int, int]:
    return (self.noise.max_participations, self.noise.min_separation)

  @property
  def amplified(self) -> bool:
    return self.noise.amplified

  @property
  def noise_sensitivity(self) -> float:
    return self.noise.sensitivity

  def noise_transform(self, *, noise_multiplier: float, l2_clip_norm: float,
                      expected_batch_size: float, key: Any = None, adaptive: Any = None):
    """The streaming correlated-noise ``optax`` transform (``dpfl.mf.matrix_noise``).

    ``adaptive``: adaptive clipping; step t's correlated noise is scaled by
    that step's C_t (the accounting argument is ``accounting.adaptive``'s).
    """
    from dpfl.mf import streaming
    return streaming.matrix_noise(self.strategy, noise_multiplier=noise_multiplier,
                                  l2_clip_norm=l2_clip_norm,
                                  expected_batch_size=expected_batch_size,
                                  sensitivity=self.noise.sensitivity,
                                  num_steps=self.noise.planned_steps, key=key,
                                  adaptive=adaptive)


def fingerprint(strategy) -> str:
  """A digest of the entries that define ``C`` (its stream parameters, else its matrix)."""
  digest = hashlib.sha256(type(strategy).__name__.encode())
  parts = [getattr(strategy, name) for name in ("buffer_decay", "output_scale", "diagonals")
           if getattr(strategy, name, None) is not None]
  if not parts:
    # ``matrix`` is a cached property (an array), ``toeplitz_coefs`` a method.
    parts = [strategy.toeplitz_coefs() if hasattr(strategy, "toeplitz_coefs")
             else strategy.matrix]
  for part in parts:
    digest.update(np.ascontiguousarray(np.asarray(part, np.float64)).tobytes())
  return digest.hexdigest()[:32]


def check_options(options: dict | None) -> dict:
  """Validates ``strategy_options`` (buffers, bands, objective, momentum; decoder, restart).

  ``decoder`` (``"honaker"``, the default, or ``"plain"``) and ``restart``
  (bool: a new tree every epoch of ``b`` steps) apply to ``"online-tree"``.
  """
  if options is None:
    return {}
  if not isinstance(options, dict):
    raise ValueError(f"strategy_options must be a dict with keys from {OPTIONS}, got "
                     f"{options!r}")
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"strategy_options has unknown keys {unknown}; allowed: {OPTIONS}")
  out = dict(options)
  for name in ("buffers", "bands"):
    if out.get(name) is not None:
      out[name] = check.positive_int(f"strategy_options[{name!r}]", out[name])
  if out.get("objective", "mean") not in ("mean", "max"):
    raise ValueError(f"strategy_options['objective'] must be 'mean' or 'max', got "
                     f"{out['objective']!r}")
  if out.get("decoder", "honaker") not in ("honaker", "plain"):
    raise ValueError(f"strategy_options['decoder'] must be 'honaker' or 'plain', got "
                     f"{out['decoder']!r}")
  if not isinstance(out.get("restart", False), (bool, np.bool_)):
    raise ValueError(f"strategy_options['restart'] must be True or False, got "
                     f"{out['restart']!r}")
  if "momentum" in out:
    out["momentum"] = check.real("strategy_options['momentum']", out["momentum"], low=0,
                                 high=1, high_open=True)
  return out


def _is_strategy(value) -> bool:
  from dpfl.mf import strategies
  return isinstance(value, strategies.Strategy)


def check_strategy(strategy) -> None:
  """A name from ``STRATEGIES`` or a ``dpfl.mf`` strategy object."""
  if isinstance(strategy, str):
    if strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES} or a dpfl.mf strategy, got "
                       f"{strategy!r}")
  elif not _is_strategy(strategy):
    raise ValueError(f"strategy must be one of {STRATEGIES} or a dpfl.mf strategy, got "
                     f"{type(strategy).__name__}")


def _is_banded(strategy) -> bool:
  return strategy == "banded" or getattr(strategy, "name", None) == "banded"


def amplified_bands(strategy, options: dict, num_steps: int) -> int:
  """The number of bands (= cyclic Poisson groups) of an amplified banded run."""
  if not _is_banded(strategy):
    raise ValueError(
        "sampling_scheme='poisson' with a strategy needs a banded strategy (amplified banded "
        "MF, Choquette-Choo et al. 2023); use sampling_scheme='cyclic' for "
        f"{getattr(strategy, 'name', strategy)!r}")
  if isinstance(strategy, str):
    return bands_for(options, limit=num_steps, why=f"num_steps={num_steps}")
  return int(strategy.num_bands)


def cyclic_poisson_rate(*, dataset_size: int, batch_size: int, bands: int) -> float:
  """The rate ``q = batch_size / (dataset_size // bands)`` of amplified banded MF.

  ``dpfl.sampling.CyclicPoissonSampler`` splits the ``dataset_size`` examples
  once into ``bands`` groups of ``dataset_size // bands`` (the remainder never
  takes part) and samples the active group at rate ``q``, so a step's
  expected batch is ``batch_size``. The one place ``make_private`` and ``dpfl
  mf --sampling cyclic-poisson`` turn a batch size into that rate.
  """
  dataset_size = check.positive_int("dataset_size", dataset_size)
  bands = check.positive_int("bands", bands)
  if bands > dataset_size:
    raise ValueError(f"bands must be in [1, dataset_size = {dataset_size}] for amplified "
                     f"banded MF (each band is a group of at least one example), got {bands}")
  group = dataset_size // bands
  try:
    batch_size = check.integer("batch_size", batch_size, low=1, high=group)
  except ValueError:
    raise ValueError(f"batch_size must be in [1, dataset_size // bands = {group}] (amplified "
                     f"banded MF: {bands} groups of {group} examples), got {batch_size!r}"
                     ) from None
  return batch_size / group


def bands_for(options: dict, *, limit: int, why: str) -> int:
  """The bands of a banded strategy: ``options['bands']``, else ``min(DEFAULT_BANDS, limit)``.

  The one place the default is decided; ``limit`` is the most bands the run
  allows (its steps, or the separation b of a unit's participations).
  """
  bands = options.get("bands", min(DEFAULT_BANDS, limit))
  if bands > limit:
    raise ValueError(f"strategy_options['bands'] must be <= {limit} ({why}), got {bands}")
  return int(bands)


def build_strategy(name: str, *, planned_steps: int, participation: tuple[int, int],
                   options: dict):
  """Builds (or optimizes) the named strategy for ``planned_steps`` under ``participation``."""
  from dpfl.mf.build import build
  from dpfl.mf.workload import Workload
  momentum = float(options.get("momentum", 0.0))
  tree_options = [name for name in ("decoder", "restart") if name in options]
  if tree_options and name != "online-tree":
    raise ValueError(f"strategy_options {tree_options} apply only to strategy='online-tree', "
                     f"not {name!r}")
  bands = None
  if name == "banded":
    k, b = participation
    bands = bands_for(options, limit=planned_steps if k == 1 else b,
                      why=f"the steps per epoch b under {k} participations, else the number "
                          "of steps")
  return build(name, planned_steps, participation=participation,
               workload=Workload(planned_steps, momentum=momentum) if momentum else None,
               objective=options.get("objective", "mean"), bands=bands,
               buffers=int(options.get("buffers", DEFAULT_BUFFERS)),
               honaker=options.get("decoder", "honaker") == "honaker",
               restart_every=participation[1] if options.get("restart") else None)


def plan(strategy, options: dict, *, sampling: accounting_plan.SamplingPlan,
         num_steps: int) -> FtrlPlan:
  """The strategy (built or checked) for ``num_steps`` on ``sampling``'s fixed order."""
  k, b = sampling.participation(num_steps)
  planned = k * b
  if sampling.scheme == "cyclic_poisson":
    if isinstance(strategy, str):
      strategy = build_strategy("banded", planned_steps=planned, participation=(k, b),
                                options={**options, "bands": b})
    _check_given(strategy, planned, b, amplified=True)
    sensitivity = float(max(strategy.column_norms()))
  else:
    if isinstance(strategy, str):
      from dpfl.mf.participation import FixedEpoch
      strategy = build_strategy(strategy, planned_steps=planned,
                                participation=FixedEpoch(k, b), options=options)
    _check_given(strategy, planned, b)
    sensitivity = float(strategy.sensitivity)
  kind = "min-sep" if sampling.scheme == "cyclic_poisson" else strategy.participation.kind
  noise = accounting_plan.NoisePlan(
      strategy=strategy.name or "custom", planned_steps=planned, sensitivity=sensitivity,
      max_participations=k, min_separation=b, amplified=sampling.scheme == "cyclic_poisson",
      options=dict(options), fingerprint=fingerprint(strategy), participation=kind)
  return FtrlPlan(strategy=strategy, noise=noise)


def _check_given(strategy, planned: int, b: int, amplified: bool = False) -> None:
  if strategy.num_steps != planned:
    raise ValueError(
        f"strategy.num_steps must be {planned} (the run's steps rounded up to whole "
        f"cycles of {b} steps), got {strategy.num_steps}")
  if amplified:
    return  # the amplified account uses column norms, whatever C was optimized for
  _, b_s = strategy.participation
  if strategy.participation.kind == "fixed-epoch" and b_s != b:
    raise ValueError(
        f"strategy's sensitivity is for a fixed-epoch order of period {b_s}, but this run's "
        f"units take part every {b} steps: build it with participation="
        f"dpfl.mf.FixedEpoch({planned // b}, {b})")
  if b_s > b:  # a b-separated pattern is b_s-separated only if b >= b_s
    raise ValueError(
        f"strategy's sensitivity is for participations {b_s} steps apart, but this run's "
        f"units take part every {b} steps: build it with participation="
        f"({planned // b}, {b})")
