"""One entry that builds any strategy by name (``dpfl mf`` and ``make_private`` share it)."""

from __future__ import annotations

from dpfl.mf import banded, blt, dense, online_tree, strategies
from dpfl.mf._checks import DEFAULT_OBJECTIVE

NAMES = ("identity", "tree", "online-tree", "sqrt", "banded", "blt", "dense")


def build(name: str, num_steps: int, *, participation=None, workload=None,
          objective: str | None = None, bands: int | None = None,
          buffers: int | None = None, honaker: bool = True,
          restart_every: int | None = None):
  """The named strategy for ``num_steps``, built or (banded / blt / dense) optimized.

  Args:
    name: one of ``NAMES``.
    num_steps: ``n``.
    participation: None (single) or ``(k, b)``.
    workload: None (prefix sums) or a ``dpfl.mf.Workload``.
    objective: ``"mean"`` or ``"max"`` (optimized strategies only); None:
      ``DEFAULT_OBJECTIVE[name]`` (max for blt, mean for banded and dense).
    bands: banded only (required).
    buffers: blt only (required).
    honaker: online-tree only: the Honaker decoder (default) or the plain one.
    restart_every: online-tree only: None or a new tree every that many steps.

  Returns:
    The strategy: ``identity``, ``tree``, ``online_tree`` or
    ``sqrt_toeplitz``'s, or the one ``optimize_banded``, ``optimize_blt`` or
    ``optimize_dense`` returns.

  Raises:
    ValueError: for an unknown ``name``, or an argument its builder refuses.
  """
  common = dict(participation=participation, workload=workload)
  if objective is None:
    objective = DEFAULT_OBJECTIVE.get(name, "mean")
  if name == "identity":
    return strategies.identity(num_steps, **common)
  if name == "tree":
    return strategies.tree(num_steps, **common)
  if name == "online-tree":
    return online_tree.online_tree(num_steps, honaker=honaker, restart_every=restart_every,
                                   **common)
  if name == "sqrt":
    return strategies.sqrt_toeplitz(num_steps, **common)
  if name == "banded":
    return banded.optimize_banded(num_steps, bands=bands, objective=objective, **common)
  if name == "blt":
    return blt.optimize_blt(num_steps, buffers=buffers, objective=objective, **common)
  if name == "dense":
    return dense.optimize_dense(num_steps, objective=objective, **common)
  raise ValueError(f"strategy must be one of {NAMES}, got {name!r}")
