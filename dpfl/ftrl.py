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
  ``(k, b)``-participation and the chosen workload (prefix sums, or the
  momentum workload with ``momentum=beta``), optimized where the strategy is
  (banded / blt / dense, ``objective``). A ``dpfl.mf`` strategy object may
  be passed instead; it must be for ``n'`` steps with a separation ``<= b``.
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
import math
from typing import Any

import accounting
from accounting import validate as check
from dpfl import cyclic_sampling

from dpfl.mf.build import NAMES as STRATEGIES
OPTIONS = ("buffers", "bands", "objective", "momentum")
DEFAULT_BUFFERS = 4
DEFAULT_BANDS = 16


@dataclasses.dataclass(frozen=True)
class FtrlPlan:
  """A DP-FTRL run's strategy and the accounting that matches it.

  Attributes:
    strategy: the ``dpfl.mf`` strategy ``C`` (``planned_steps`` square).
    planned_steps: ``n'``, the size of ``C`` (whole epochs / band cycles).
    participation: ``(k, b)`` each unit's steps obey.
    privacy_unit: ``"example"`` or ``"user"``.
    amplified: True for amplified banded MF with cyclic Poisson sampling.
    sampling_prob: ``q`` per unit of the active group (amplified only).
    noise_sensitivity: the ``sens`` the noise is scaled by.
  """

  strategy: Any
  planned_steps: int
  participation: tuple[int, int]
  privacy_unit: str
  amplified: bool = False
  sampling_prob: float | None = None

  @property
  def noise_sensitivity(self) -> float:
    if self.amplified:
      return float(max(self.strategy.column_norms()))
    return float(self.strategy.sensitivity)

  def mechanism(self, *, noise_multiplier: float, num_steps: int) -> accounting.Mechanism:
    """The accounting description of the first ``num_steps`` steps."""
    if self.amplified:
      return accounting.AmplifiedBandedMatrixMechanism(
          noise_multiplier=noise_multiplier, sampling_prob=self.sampling_prob,
          num_steps=num_steps, num_bands=self.strategy.num_bands)
    k, b = self.participation
    cls = accounting.UserMatrixMechanism if self.privacy_unit == "user" else \
        accounting.MatrixMechanism
    return cls(noise_multiplier=noise_multiplier, sensitivity=self.noise_sensitivity,
               planned_steps=self.planned_steps, strategy=self.strategy.name or "custom",
               max_participations=k, min_separation=b if k > 1 else None,
               num_steps=num_steps)

  def noise(self, *, noise_multiplier: float, l2_clip_norm: float,
            expected_batch_size: float, key: Any = None):
    """The streaming correlated-noise ``optax`` transform (``dpfl.mf.matrix_noise``)."""
    from dpfl.mf import streaming
    return streaming.matrix_noise(self.strategy, noise_multiplier=noise_multiplier,
                                  l2_clip_norm=l2_clip_norm,
                                  expected_batch_size=expected_batch_size,
                                  sensitivity=self.noise_sensitivity,
                                  num_steps=self.planned_steps, key=key)


def cyclic_steps(epochs: float, steps_per_epoch: int) -> int:
  """Steps of ``epochs`` passes over a cyclic order of ``steps_per_epoch`` batches.

  A cyclic epoch is ``b = N // B`` steps (the remainder never takes part), not
  ``N / B``: 40 epochs of 1438 examples in batches of 256 are 200 steps, each
  example in 40 of them (``ceil(40 * 1438 / 256) = 225`` would be 45 passes).
  """
  return max(1, math.ceil(round(float(epochs) * steps_per_epoch, 9)))


def check_options(options: dict | None) -> dict:
  """Validates ``strategy_options`` (buffers, bands, objective, momentum)."""
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
    bands = options.get("bands", min(DEFAULT_BANDS, num_steps))
    if bands > num_steps:
      raise ValueError(f"strategy_options['bands'] must be <= num_steps={num_steps}, got {bands}")
    return int(bands)
  return int(strategy.num_bands)


def build_strategy(name: str, *, planned_steps: int, participation: tuple[int, int],
                   options: dict):
  """Builds (or optimizes) the named strategy for ``planned_steps`` under ``participation``."""
  from dpfl.mf.build import build
  from dpfl.mf.workload import Workload
  momentum = float(options.get("momentum", 0.0))
  bands = None
  if name == "banded":
    k, b = participation
    limit = planned_steps if k == 1 else b
    bands = options.get("bands", min(DEFAULT_BANDS, limit))
    if bands > limit:
      raise ValueError(f"strategy_options['bands'] must be <= {limit} (the steps per epoch "
                       f"b under {k} participations, else the number of steps), got {bands}")
  return build(name, planned_steps, participation=participation,
               workload=Workload(planned_steps, momentum=momentum) if momentum else None,
               objective=options.get("objective", "mean"), bands=bands,
               buffers=int(options.get("buffers", DEFAULT_BUFFERS)))


def plan(strategy, options: dict, *, sampler, num_steps: int, privacy_unit: str) -> FtrlPlan:
  """The ``FtrlPlan`` for a run of ``num_steps`` on ``sampler``'s batches."""
  if isinstance(sampler, cyclic_sampling.CyclicPoissonSampler):
    b = sampler.num_groups
    planned = b * math.ceil(num_steps / b)
    participation = (planned // b, b)
    if isinstance(strategy, str):
      strategy = build_strategy("banded", planned_steps=planned, participation=participation,
                                options={**options, "bands": b})
    _check_given(strategy, planned, b, amplified=True)
    return FtrlPlan(strategy=strategy, planned_steps=planned, participation=participation,
                    privacy_unit=privacy_unit, amplified=True,
                    sampling_prob=sampler.sampling_prob)
  k, b = sampler.participation(num_steps)
  planned = k * b
  if isinstance(strategy, str):
    strategy = build_strategy(strategy, planned_steps=planned, participation=(k, b),
                              options=options)
  _check_given(strategy, planned, b)
  return FtrlPlan(strategy=strategy, planned_steps=planned, participation=(k, b),
                  privacy_unit=privacy_unit)


def _check_given(strategy, planned: int, b: int, amplified: bool = False) -> None:
  if strategy.num_steps != planned:
    raise ValueError(
        f"strategy.num_steps must be {planned} (the run's steps rounded up to whole "
        f"cycles of {b} steps), got {strategy.num_steps}")
  if amplified:
    return  # the amplified account uses column norms, whatever C was optimized for
  _, b_s = strategy.participation
  if b_s > b:  # a b-separated pattern is b_s-separated only if b >= b_s
    raise ValueError(
        f"strategy's sensitivity is for participations {b_s} steps apart, but this run's "
        f"units take part every {b} steps: build it with participation="
        f"({planned // b}, {b})")
