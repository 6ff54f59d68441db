"""Strategies ``C`` for the factorization ``A = B C``, and the fixed ones.

A strategy is a frozen value: the number of steps ``n``, the participation
pattern it is evaluated under, the workload ``A``, and its parameters. From
those it derives (lazily, cached) ``matrix`` (dense ``C``), ``sensitivity``,
``max_loss`` and ``mean_loss`` (definitions in ``dpfl.mf.losses``).

The mechanism it describes: release ``B (C x + sigma * sens(C) * z)`` with
``z ~ N(0, I)``, ``x`` the stream of clipped gradient sums (clip norm 1). Each
unit's contribution to ``C x`` has L2 norm at most ``sens(C)`` under the
strategy's participation pattern, so this is the Gaussian mechanism with noise
multiplier ``sigma`` followed by post-processing; the released prefix sums
carry noise ``sigma^2 * max_loss`` (worst step) or ``sigma^2 * mean_loss``
(average step) in variance, per coordinate.

Fixed strategies here: ``identity`` (DP-SGD), ``tree`` (binary-tree
aggregation with the Honaker estimator) and ``sqrt_toeplitz`` (square-root
factorization). Optimized ones live in ``banded``, ``blt`` and ``dense``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import numpy as np

from dpfl.mf import _threads
from dpfl.mf import losses as _losses
from dpfl.mf import sensitivity as _sens
from dpfl.mf import toeplitz as _toeplitz
from dpfl.mf.participation import Participation, as_participation
from dpfl.mf.workload import Workload, as_workload


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Strategy:
  """Base class: a strategy matrix ``C`` with its participation and workload.

  Attributes:
    num_steps: ``n``.
    participation: ``(k, b)`` the sensitivity is computed under: a
      min-separation ``Participation`` (a plain pair) or a ``FixedEpoch``.
    workload: ``A`` the losses are computed for.
    objective: ``"max"`` / ``"mean"`` it was optimized for (None: not optimized).
    info: optimizer diagnostics (iterations, convergence), for reporting.
  """

  name: ClassVar[str] = ""

  num_steps: int
  participation: Participation
  workload: Workload
  objective: str | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "participation",
                       as_participation(self.num_steps, self.participation))
    object.__setattr__(self, "workload", as_workload(self.num_steps, self.workload))

  # --- to implement -----------------------------------------------------------
  def materialize(self) -> np.ndarray:
    """The dense ``n x n`` lower-triangular ``C``."""
    raise NotImplementedError

  def _sensitivity_squared(self) -> tuple[float, bool]:
    return _sens.gram_sensitivity_squared(self.gram(), self.participation)

  def row_errors(self) -> np.ndarray:
    """``||B_i||^2`` for ``B = A C^{-1}`` (unit noise, before sensitivity)."""
    return _losses.row_errors(self.matrix, self.workload)

  # --- derived ----------------------------------------------------------------
  def gram(self) -> np.ndarray:
    """``X = C^T C``."""
    C = self.matrix
    return C.T @ C

  @functools.cached_property
  def matrix(self) -> np.ndarray:
    """Dense ``C`` (read-only), built on first use."""
    if not _toeplitz.fits_dense(self.num_steps):
      raise ValueError(
          f"num_steps={self.num_steps} is too large to materialize an n x n matrix; use "
          "the strategy's compact parameters")
    C = np.ascontiguousarray(self.materialize(), dtype=float)
    C.setflags(write=False)
    return C

  @functools.cached_property
  def _sens_and_exact(self) -> tuple[float, bool]:
    with _threads.one_blas_thread():
      return self._sensitivity_squared()

  @property
  def sensitivity(self) -> float:
    """``sens(C)`` under ``participation`` (see ``dpfl.mf.sensitivity``)."""
    return math.sqrt(self._sens_and_exact[0])

  @property
  def sensitivity_exact(self) -> bool:
    """False only when ``sensitivity`` is the (valid) Alg. 4 upper bound."""
    return self._sens_and_exact[1]

  @functools.cached_property
  def _loss_pair(self) -> tuple[float, float]:
    sens_squared = self._sens_and_exact[0]
    with _threads.one_blas_thread():
      return _losses.max_and_mean(self.row_errors(), sens_squared)

  @property
  def max_loss(self) -> float:
    """``sens(C)^2 * max_i ||B_i||^2``."""
    return self._loss_pair[0]

  @property
  def mean_loss(self) -> float:
    """``sens(C)^2 * ||B||_F^2 / n``."""
    return self._loss_pair[1]

  def loss(self, objective: str) -> float:
    """``max_loss`` or ``mean_loss``, by name."""
    from dpfl.mf import _checks
    return self.max_loss if _checks.objective(objective) == "max" else self.mean_loss

  def summary(self) -> dict[str, Any]:
    """The numbers the ``dpfl mf`` command prints, JSON-ready."""
    k, b = self.participation
    return {"strategy": self.name, "steps": self.num_steps, "epochs": k, "min_sep": b,
            "participation": self.participation.kind,
            "sensitivity": self.sensitivity, "sensitivity_exact": self.sensitivity_exact,
            "max_loss": self.max_loss, "mean_loss": self.mean_loss}


class _ToeplitzLosses:
  """Mixin: O(n) losses and sensitivity from Toeplitz coefficients."""

  def toeplitz_coefs(self) -> np.ndarray:
    """The first column ``c_0, c_1, ...`` of ``C`` (zero past its length)."""
    raise NotImplementedError

  def materialize(self) -> np.ndarray:
    return _toeplitz.materialize(self.toeplitz_coefs(), self.num_steps)

  def _sensitivity_squared(self) -> tuple[float, bool]:
    value = _toeplitz.sensitivity_squared(self.toeplitz_coefs(), self.participation,
                                          self.num_steps)
    if value is None:  # no O(n) rule applies: exact (or bounded) from the dense matrix
      return Strategy._sensitivity_squared(self)
    return value, True

  def inverse_toeplitz_coefs(self) -> np.ndarray:
    """The ``n`` coefficients of ``C^{-1}`` (by recursion, ``O(n len(coefs))``)."""
    return _toeplitz.inverse_coefs(self.toeplitz_coefs(), self.num_steps)

  def row_errors(self) -> np.ndarray:
    if self.workload.is_toeplitz:
      return _toeplitz.row_errors(
          _toeplitz.apply_workload(self.inverse_toeplitz_coefs(), self.workload))
    return Strategy.row_errors(self)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class IdentityStrategy(_ToeplitzLosses, Strategy):
  """``C = I``: independent noise at every step (DP-SGD).

  Its columns are orthogonal unit vectors, so ``sens(C)^2 = k``, the number
  of participations (under fixed-epoch order ``k = ceil(n / b)``). Built by
  ``identity``.

  Attributes:
    num_steps: ``n`` >= 1.
    participation: the pattern ``sensitivity`` is computed under, given as
      None (single participation), a ``(k, b)`` pair or ``Participation``
      (min-separation), or a ``FixedEpoch``; stored checked, as a
      ``Participation`` or ``FixedEpoch``.
    workload: ``A`` the losses are computed for, given as None (prefix sums)
      or a ``Workload`` of ``n`` steps; stored as a ``Workload``.
    objective: ``"max"`` / ``"mean"`` it was optimized for; None (the
      default) for a fixed strategy.
    info: optimizer diagnostics, for reporting; empty by default.
  """

  name: ClassVar[str] = "identity"

  def toeplitz_coefs(self) -> np.ndarray:
    """``[1]``: the first column of ``I``, zero-padded."""
    return np.array([1.0])

  def _sensitivity_squared(self) -> tuple[float, bool]:
    # Orthogonal unit columns: sens^2 = number of participations.
    return float(self.participation.num_participations), True


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ToeplitzStrategy(_ToeplitzLosses, Strategy):
  """A lower-triangular Toeplitz ``C`` given by its first column ``coefs``.

  ``C[i, j] = coefs[i - j]`` for ``i >= j``. Its losses (for a Toeplitz
  workload) and its sensitivity (where a Toeplitz rule of
  ``dpfl.mf.sensitivity`` applies) are computed from the coefficients,
  without the ``n x n`` matrix; otherwise from the dense ``C``.

  Attributes:
    coefs: ``c_0, c_1, ...``, the first column of ``C``: finite, ``c_0 != 0``
      (``C`` invertible); truncated to ``n`` entries, missing ones are 0.
      Stored as a read-only float array.
    num_steps: ``n`` >= 1.
    participation: the pattern ``sensitivity`` is computed under, given as
      None (single participation), a ``(k, b)`` pair or ``Participation``
      (min-separation), or a ``FixedEpoch``; stored checked, as a
      ``Participation`` or ``FixedEpoch``.
    workload: ``A`` the losses are computed for, given as None (prefix sums)
      or a ``Workload`` of ``n`` steps; stored as a ``Workload``.
    objective: ``"max"`` / ``"mean"`` it was optimized for; None (the
      default) for a fixed strategy.
    info: optimizer diagnostics, for reporting; empty by default.
  """

  name: ClassVar[str] = "toeplitz"
  coefs: np.ndarray

  def __post_init__(self):
    super().__post_init__()
    coefs = np.array(self.coefs, dtype=float).reshape(-1)[:self.num_steps]
    if not len(coefs) or coefs[0] == 0 or not np.all(np.isfinite(coefs)):
      raise ValueError("coefs must be finite with coefs[0] != 0 (C invertible)")
    coefs.setflags(write=False)
    object.__setattr__(self, "coefs", coefs)

  def toeplitz_coefs(self) -> np.ndarray:
    """``coefs``, the first column of ``C`` (zero past its length)."""
    return self.coefs


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class SqrtToeplitzStrategy(ToeplitzStrategy):
  """The square-root factorization: coefficients of ``(1 - x)^(-1/2)``, ``C C = A``.

  ``C C = A`` holds for the prefix-sum matrix ``A``; the losses are computed
  for the strategy's ``workload``, whatever it is. Built by ``sqrt_toeplitz``.

  Attributes:
    coefs: the first column of ``C``, as for ``ToeplitzStrategy``;
      ``sqrt_toeplitz`` gives the ``n`` coefficients of ``(1 - x)^(-1/2)``,
      ``c_0 = 1, c_k = c_{k-1} (2k - 1) / (2k)``.
    num_steps: ``n`` >= 1.
    participation: the pattern ``sensitivity`` is computed under, given as
      None (single participation), a ``(k, b)`` pair or ``Participation``
      (min-separation), or a ``FixedEpoch``; stored checked, as a
      ``Participation`` or ``FixedEpoch``.
    workload: ``A`` the losses are computed for, given as None (prefix sums)
      or a ``Workload`` of ``n`` steps; stored as a ``Workload``.
    objective: ``"max"`` / ``"mean"`` it was optimized for; None (the
      default) for a fixed strategy.
    info: optimizer diagnostics, for reporting; empty by default.
  """

  name: ClassVar[str] = "sqrt"

  def inverse_toeplitz_coefs(self) -> np.ndarray:
    """``(1 - x)^(1/2)`` in closed form, ``O(n)`` (the recursion is ``O(n^2)``)."""
    if len(self.coefs) == self.num_steps and np.array_equal(
        self.coefs, _toeplitz.sqrt_coefs(self.num_steps)):
      return _toeplitz.sqrt_inverse_coefs(self.num_steps)
    return super().inverse_toeplitz_coefs()  # built with other coefficients


def tree_matrix(num_steps: int) -> np.ndarray:
  """Binary-tree aggregation: one 0/1 row per tree node, ``C[v, j] = 1`` if leaf ``j`` is under ``v``.

  The tree has ``2^L >= n`` leaves (``L = ceil(log2 n)``); leaves past ``n - 1``
  and nodes covering none of the first ``n`` leaves are dropped. Rows are
  ordered by level (leaves first), then left to right.

  Args:
    num_steps: ``n`` >= 1, the number of leaves used.

  Returns:
    The float 0/1 node-by-leaf matrix ``T``, shape
    ``[sum_{l=0}^{L} ceil(n / 2^l), n]`` (not square: ``TreeStrategy`` uses
    ``T^T T``).
  """
  levels = max(num_steps - 1, 0).bit_length()
  rows = []
  steps = np.arange(num_steps)
  for level in range(levels + 1):
    block = steps >> level
    rows.append((block[None, :] == np.arange(block[-1] + 1)[:, None]).astype(float))
  return np.concatenate(rows, axis=0)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class TreeStrategy(Strategy):
  """Binary-tree aggregation with the Honaker (least-squares) estimator.

  The tree strategy ``T = tree_matrix(n)`` is ``(~2n) x n``; the Honaker
  estimator is ``B = A T^+`` (Honaker 2015), whose squared row norms are
  ``diag(A X^{-1} A^T)`` with ``X = T^T T``. ``matrix`` is the square,
  lower-triangular ``C`` with ``C^T C = X`` (reverse Cholesky): it releases
  the same distribution (sensitivity and ``B B^T = A X^{-1} A^T`` depend on
  ``X`` only) with a causal ``B = A C^{-1}``, so it streams like every other
  strategy (Denisov et al. 2022, arXiv 2202.08312, Sec. 3: lower-triangular
  factors lose nothing).

  Its sensitivity is computed from ``X`` (``dpfl.mf.sensitivity``): exact,
  or a valid upper bound where ``sensitivity_exact`` is False. Built by
  ``tree``.

  Attributes:
    num_steps: ``n`` >= 1.
    participation: the pattern ``sensitivity`` is computed under, given as
      None (single participation), a ``(k, b)`` pair or ``Participation``
      (min-separation), or a ``FixedEpoch``; stored checked, as a
      ``Participation`` or ``FixedEpoch``.
    workload: ``A`` the losses are computed for, given as None (prefix sums)
      or a ``Workload`` of ``n`` steps; stored as a ``Workload``.
    objective: ``"max"`` / ``"mean"`` it was optimized for; None (the
      default) for a fixed strategy.
    info: optimizer diagnostics, for reporting; empty by default.
  """

  name: ClassVar[str] = "tree"

  def gram(self) -> np.ndarray:
    # X_ij = number of tree nodes covering both leaves i and j.
    steps = np.arange(self.num_steps)
    X = np.zeros((self.num_steps, self.num_steps))
    for level in range(max(self.num_steps - 1, 0).bit_length() + 1):
      X += (steps[:, None] >> level) == (steps[None, :] >> level)
    return X

  def materialize(self) -> np.ndarray:
    X = self.gram()
    return np.linalg.cholesky(X[::-1, ::-1]).T[::-1, ::-1]

  def _sensitivity_squared(self) -> tuple[float, bool]:
    return _sens.gram_sensitivity_squared(self.gram(), self.participation)

  def row_errors(self) -> np.ndarray:
    return _losses.gram_row_errors(self.gram(), self.workload)


def identity(num_steps: int, *, participation=None, workload=None) -> IdentityStrategy:
  """DP-SGD's ``C = I``: ``sens^2 = k``; on prefix sums ``max_loss = k n``.

  Args:
    num_steps: ``n`` >= 1.
    participation: None (single participation), a ``(k, b)`` pair or
      ``Participation`` (min-separation), or a ``FixedEpoch``.
    workload: None (prefix sums) or a ``Workload`` of ``n`` steps.

  Returns:
    An ``IdentityStrategy``.
  """
  return IdentityStrategy(num_steps=check_steps(num_steps), participation=participation,
                          workload=workload)


def tree(num_steps: int, *, participation=None, workload=None) -> TreeStrategy:
  """Binary-tree aggregation with the Honaker estimator (see ``TreeStrategy``).

  Its losses and sensitivity come from the dense ``n x n`` Gram matrix, so
  ``num_steps`` is limited to 8192.

  Args:
    num_steps: ``n``, in ``[1, 8192]``.
    participation: None (single participation), a ``(k, b)`` pair or
      ``Participation`` (min-separation), or a ``FixedEpoch``.
    workload: None (prefix sums) or a ``Workload`` of ``n`` steps.

  Returns:
    A ``TreeStrategy``.
  """
  n = check_steps(num_steps)
  if not _toeplitz.fits_dense(n):
    raise ValueError(f"num_steps must be <= 8192 for the tree strategy (dense n x n Gram), got {n}")
  return TreeStrategy(num_steps=n, participation=participation, workload=workload)


def sqrt_toeplitz(num_steps: int, *, participation=None, workload=None) -> SqrtToeplitzStrategy:
  """The square-root Toeplitz factorization ``C = A^{1/2}`` of prefix sums.

  ``C`` is the same for every workload (the square root of the prefix-sum
  matrix); ``workload`` only sets what its losses are computed for.

  Args:
    num_steps: ``n`` >= 1.
    participation: None (single participation), a ``(k, b)`` pair or
      ``Participation`` (min-separation), or a ``FixedEpoch``.
    workload: None (prefix sums) or a ``Workload`` of ``n`` steps.

  Returns:
    A ``SqrtToeplitzStrategy``.
  """
  n = check_steps(num_steps)
  return SqrtToeplitzStrategy(num_steps=n, participation=participation, workload=workload,
                              coefs=_toeplitz.sqrt_coefs(n))


def check_steps(num_steps) -> int:
  from dpfl.mf import _checks
  return _checks.integer("num_steps", num_steps)
