"""The online tree aggregation of DP-FTRL (Kairouz et al. 2021, arXiv 2103.00039).

The tree grows with the stream: after step ``t`` it holds one node per
*complete* dyadic interval ``[j 2^l, (j + 1) 2^l)`` inside ``[0, t]``, each
released once (with fresh noise) when its last leaf arrives. The prefix sum
``x_0 + ... + x_t`` is the sum of the nodes of the binary decomposition of
``t + 1`` (``popcount(t + 1)`` nodes). Unlike ``dpfl.mf.tree`` it never pads
to ``2^ceil(log2 n)`` leaves, so at ``n`` not a power of two no node covers a
leaf that does not exist, and a leaf sits under at most ``floor(log2 n) + 1``
nodes (11 at ``n = 1600``; the padded tree: 12). This is TF Privacy's
``tree_aggregation`` / ``TreeCumulativeSumQuery`` and the sensitivity its
``tree_aggregation_accountant`` computes (Appendix D of the paper).

Privacy. The tree releases ``T x + sigma * sens(T) * z``, ``T`` the 0/1
node-by-leaf matrix (``online_tree_matrix``). Every entry of ``X = T^T T``
(``X_ij`` = nodes covering both ``i`` and ``j``) is non-negative, so
``sens(T)^2`` is the largest ``sum_v c_v^2`` over participation patterns,
``c_v`` the unit's participations under node ``v``: exactly the quantity TF
Privacy's accountant maximizes, and what ``dpfl.mf.sensitivity`` computes from
``X``.

Decoders. ``honaker=True`` (default, as TF Privacy's and TFF's
``use_efficient=True`` default): the least-squares estimate of the prefix sums
from all nodes (Honaker 2015), noise covariance ``A X^{-1} A^T``, released
causally through the square lower-triangular ``C`` with ``C^T C = X``
(``dpfl.mf.strategies.TreeStrategy`` explains why this is the same mechanism
up to post-processing). It never does worse than the plain decoder and is
strictly better on average from ``n = 2`` on (Gauss-Markov: no linear
unbiased estimate from the same nodes has less variance, so TF Privacy's
online ``EfficientTreeAggregator``, which refines each node from its own
subtree only, cannot beat it either).
``honaker=False``: the plain decoder (sum of the decomposition's nodes), noise
covariance ``S = B_tree B_tree^T``; ``C = L^{-1} A`` with ``L L^T = S``
(``L`` lower triangular) streams exactly that noise. Its sensitivity is
reported as ``sens(T)`` (the tree's), which upper-bounds ``sens(C)``
(``C^T C = A^T S^{-1} A <= T^T T``): never an understated ε.

Restart (``restart_every=b``): the paper's DP-FTRL-TreeRestart. A new tree
every ``b`` steps; the previous trees' final (noisy) prefix sums carry over.
``C`` is block-diagonal (one online tree of ``b`` leaves per block, the last
block possibly shorter), so with ``b`` the separation of a unit's
participations at most one lands in a block and ``sens^2 = sum`` over the
unit's blocks of ``floor(log2 b) + 1`` (with ``k`` participations, one per
epoch of ``b`` steps: ``k (floor(log2 b) + 1)``, TF Privacy's
``compute_rdp_tree_restart``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from dpfl.mf import losses as _losses
from dpfl.mf import sensitivity as _sens
from dpfl.mf import toeplitz as _toeplitz
from dpfl.mf.strategies import Strategy, check_steps


def _levels(num_steps: int) -> int:
  """Levels of the online tree over ``n`` leaves: ``floor(log2 n) + 1``."""
  return int(num_steps).bit_length()


def online_tree_matrix(num_steps: int) -> np.ndarray:
  """``T``: one 0/1 row per complete dyadic interval inside ``[0, n)``, in release order.

  Row ``v`` has ones on the leaves of node ``v``. Rows are ordered by the step
  that completes the node (its last leaf), then by level (leaves first): the
  order the online tree releases them. ``T`` has ``2 n - popcount(n)`` rows.

  Args:
    num_steps: ``n`` >= 1, the number of leaves (steps).

  Returns:
    The float 0/1 matrix ``T``, shape ``[2 n - popcount(n), n]``.
  """
  n = check_steps(num_steps)
  nodes = []  # (last leaf, level, first leaf)
  for level in range(_levels(n)):
    size = 1 << level
    nodes += [(start + size - 1, level, start) for start in range(0, n - size + 1, size)]
  nodes.sort()
  T = np.zeros((len(nodes), n))
  for row, (last, _, first) in enumerate(nodes):
    T[row, first:last + 1] = 1.0
  return T


def online_tree_gram(num_steps: int) -> np.ndarray:
  """``X = T^T T``: ``X_ij`` = complete nodes covering both leaves ``i`` and ``j``.

  Built directly (without ``T``); the sensitivity of the online tree is
  computed from it.

  Args:
    num_steps: ``n`` >= 1, the number of leaves (steps).

  Returns:
    ``X``, an ``n x n`` float array of non-negative integers (``X_ii`` is
    the number of nodes above leaf ``i``, at most ``floor(log2 n) + 1``).
  """
  n = check_steps(num_steps)
  steps = np.arange(n)
  X = np.zeros((n, n))
  for level in range(_levels(n)):
    block = steps >> level
    complete = ((block + 1) << level) <= n
    X += (block[:, None] == block[None, :]) & complete[:, None]
  return X


def prefix_decoder(num_steps: int) -> np.ndarray:
  """The plain decoder ``B_tree`` (``n x rows(T)``): ``B_tree T = A``, prefix sums.

  Row ``t`` picks the nodes of the binary decomposition of ``t + 1``: the
  complete subtrees ``[0, 2^a)``, ``[2^a, 2^a + 2^b)``, ... (``a > b > ...``).
  """
  n = check_steps(num_steps)
  T = online_tree_matrix(n)
  first = np.argmax(T > 0, axis=1)
  size = T.sum(axis=1).astype(int)
  index = {(int(f), int(s)): row for row, (f, s) in enumerate(zip(first, size))}
  B = np.zeros((n, T.shape[0]))
  for t in range(n):
    start = 0
    for level in reversed(range(_levels(t + 1))):
      if (t + 1) >> level & 1:
        B[t, index[(start, 1 << level)]] = 1.0
        start += 1 << level
  return B


def _block_sizes(num_steps: int, restart_every: int | None) -> list[int]:
  if restart_every is None or restart_every >= num_steps:
    return [num_steps]
  full, rest = divmod(num_steps, restart_every)
  return [restart_every] * full + ([rest] if rest else [])


def _block_diag(blocks: list[np.ndarray]) -> np.ndarray:
  n = sum(len(b) for b in blocks)
  out = np.zeros((n, n))
  at = 0
  for block in blocks:
    out[at:at + len(block), at:at + len(block)] = block
    at += len(block)
  return out


def _plain_block(size: int) -> np.ndarray:
  """``C = L^{-1} A``: streams the plain decoder's noise ``A^{-1} B_tree z`` exactly."""
  B = prefix_decoder(size)
  L = np.linalg.cholesky(B @ B.T)
  return np.linalg.solve(L, np.tril(np.ones((size, size))))


def _honaker_block(size: int) -> np.ndarray:
  X = online_tree_gram(size)
  return np.linalg.cholesky(X[::-1, ::-1]).T[::-1, ::-1]


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class OnlineTreeStrategy(Strategy):
  """The online tree (no padding), Honaker or plain decoder, optional restarts.

  See the module docstring for the mechanism, its sensitivity and decoders.

  Attributes:
    honaker: True: least-squares (Honaker) decoder; False: the plain sum of
      the binary decomposition's nodes.
    restart_every: None (one tree for the run) or ``b``: a new tree every
      ``b`` steps (DP-FTRL-TreeRestart).
  """

  name: ClassVar[str] = "online-tree"
  honaker: bool = True
  restart_every: int | None = None

  def block_sizes(self) -> list[int]:
    """Leaves of each tree, in order (one entry without restarts)."""
    return _block_sizes(self.num_steps, self.restart_every)

  def tree_gram(self) -> np.ndarray:
    """``T^T T`` of the (block-diagonal, with restarts) tree: what the sensitivity is of."""
    return _block_diag([online_tree_gram(s) for s in self.block_sizes()])

  def materialize(self) -> np.ndarray:
    block = _honaker_block if self.honaker else _plain_block
    return _block_diag([block(s) for s in self.block_sizes()])

  def _sensitivity_squared(self) -> tuple[float, bool]:
    return _sens.gram_sensitivity_squared(self.tree_gram(), self.participation)

  def row_errors(self) -> np.ndarray:
    if self.honaker:
      return _losses.gram_row_errors(self.tree_gram(), self.workload)
    return Strategy.row_errors(self)

  def summary(self):
    return {**super().summary(), "decoder": "honaker" if self.honaker else "plain",
            "restart_every": self.restart_every}


def online_tree(num_steps: int, *, participation=None, workload=None, honaker: bool = True,
                restart_every: int | None = None) -> OnlineTreeStrategy:
  """The online tree aggregation of DP-FTRL (see ``OnlineTreeStrategy``).

  Args:
    num_steps: ``n``, in ``[1, 8192]`` (losses and sensitivity use the dense
      ``n x n`` Gram matrix).
    participation: None (single) or ``(k, b)``.
    workload: None (prefix sums) or a ``dpfl.mf.Workload``.
    honaker: the Honaker (least-squares) decoder (default, as TF Privacy's
      ``use_efficient=True``) or the plain one.
    restart_every: None or a new tree every ``restart_every`` steps, in
      ``[1, n]`` (DP-FTRL-TreeRestart; use the epoch length).

  Returns:
    An ``OnlineTreeStrategy``.
  """
  from accounting import validate as check
  n = check_steps(num_steps)
  if not _toeplitz.fits_dense(n):
    raise ValueError(
        f"num_steps must be <= 8192 for the online-tree strategy (dense n x n Gram), got {n}")
  if not isinstance(honaker, (bool, np.bool_)):
    raise ValueError(f"honaker must be True or False, got {honaker!r}")
  if restart_every is not None:
    restart_every = check.integer("restart_every", restart_every, low=1, high=n)
  return OnlineTreeStrategy(num_steps=n, participation=participation, workload=workload,
                            honaker=bool(honaker), restart_every=restart_every)
