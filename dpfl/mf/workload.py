"""Workloads: the linear maps of the gradient stream that training releases.

A workload ``A`` (``n x n``, lower triangular) maps the stream of clipped
gradient sums ``g_0 .. g_{n-1}`` to what the model parameters depend on. SGD
releases prefix sums, ``A_ij = 1`` for ``j <= i``; SGD with heavy-ball
momentum ``beta`` releases prefix sums of the momentum buffers
``m_s = beta m_{s-1} + g_s``; a learning-rate schedule ``eta_s`` weights them:

    theta_t - theta_0 = -sum_{s <= t} eta_s m_s,
    A_ij = sum_{s=j}^{i} eta_s beta^(s - j)          (j <= i).

(Denisov et al. 2022, "Improved Differential Privacy for SGD via Optimal
Private Linear Operators on Adaptive Streams", arXiv 2202.08312, Sec. 5.)

With a constant learning rate the workload is Toeplitz with generating
function ``eta / ((1 - x)(1 - beta x))``, which Toeplitz strategies (square
root, banded Toeplitz, BLT) exploit for O(n) losses.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dpfl.mf import _checks as check


@dataclasses.dataclass(frozen=True)
class Workload:
  """A prefix-sum workload, optionally with momentum and a learning-rate schedule.

  Attributes:
    num_steps: ``n``.
    momentum: heavy-ball ``beta`` in ``[0, 1)``; 0 is plain prefix sums.
    learning_rates: None (all 1), or ``n`` positive per-step learning rates.
  """

  num_steps: int
  momentum: float = 0.0
  learning_rates: tuple[float, ...] | None = None

  def __post_init__(self):
    n = check.integer("num_steps", self.num_steps)
    object.__setattr__(self, "num_steps", n)
    object.__setattr__(self, "momentum", check.unit_interval("momentum", self.momentum))
    if self.learning_rates is not None:
      rates = tuple(self.learning_rates)
      if len(rates) != n:
        raise ValueError(
            f"learning_rates must be None or {n} (num_steps) finite numbers > 0, got "
            f"{len(rates)} values")
      rates = tuple(check.positive("learning_rates", r) for r in rates)
      object.__setattr__(self, "learning_rates", rates)

  @property
  def is_toeplitz(self) -> bool:
    """Whether ``A`` is Toeplitz (constant learning rate)."""
    rates = self.learning_rates
    return rates is None or all(r == rates[0] for r in rates)

  @property
  def scale(self) -> float:
    """The constant learning rate of a Toeplitz workload."""
    if not self.is_toeplitz:
      raise ValueError("scale is defined only for a constant learning rate")
    return 1.0 if self.learning_rates is None else self.learning_rates[0]

  def filter_sections(self) -> np.ndarray:
    """First-order sections of ``A(x)`` for ``scipy.signal.sosfilt``.

    Rows ``[b0, b1, b2, a0, a1, a2]``: ``scale / (1 - x)`` and, with momentum,
    ``1 / (1 - beta x)``. Only for Toeplitz workloads.
    """
    sections = [[self.scale, 0.0, 0.0, 1.0, -1.0, 0.0]]
    if self.momentum:
      sections.append([1.0, 0.0, 0.0, 1.0, -self.momentum, 0.0])
    return np.array(sections)

  def toeplitz_coefs(self) -> np.ndarray:
    """First column of a Toeplitz ``A``: ``a_t = scale (1 - beta^(t+1)) / (1 - beta)``."""
    t = np.arange(self.num_steps)
    if self.momentum:
      coefs = -np.expm1((t + 1) * math.log(self.momentum)) / (1 - self.momentum)
    else:
      coefs = np.ones(self.num_steps)
    return self.scale * coefs

  def matrix(self) -> np.ndarray:
    """The dense ``n x n`` workload matrix ``A``."""
    n = self.num_steps
    if self.is_toeplitz:
      a = self.toeplitz_coefs()
      idx = np.arange(n)
      diff = idx[:, None] - idx[None, :]
      return np.where(diff >= 0, a[np.clip(diff, 0, None)], 0.0)
    # A = P diag(eta) M_beta with P the prefix-sum matrix and M_beta_sj = beta^(s-j).
    rates = np.asarray(self.learning_rates)
    idx = np.arange(n)
    diff = idx[:, None] - idx[None, :]
    momentum = np.where(diff >= 0, self.momentum ** np.clip(diff, 0, None), 0.0)
    return np.cumsum(rates[:, None] * momentum, axis=0)


def as_workload(num_steps: int, value) -> Workload:
  """Accepts None (prefix sums) or a ``Workload`` of the right length."""
  if value is None:
    return Workload(num_steps)
  if not isinstance(value, Workload):
    raise ValueError(f"workload must be None or a dpfl.mf.Workload, got {value!r}")
  if value.num_steps != num_steps:
    raise ValueError(
        f"workload.num_steps must equal num_steps={num_steps}, got {value.num_steps}")
  return value
