"""From a batch's indices and mask to the examples themselves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _is_example_sequence(dataset) -> bool:
  """True for indexable datasets of examples; False for pytrees of arrays."""
  if isinstance(dataset, (np.ndarray, jax.Array, Mapping, tuple)):
    return False
  return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def num_examples(dataset: Any) -> int:
  """The number of examples in ``dataset``, in the sense ``gather`` indexes it.

  ``len(dataset)`` for an indexable sequence of examples; the shared leading
  size of the arrays for a pytree of arrays.
  """
  return len(dataset) if _is_example_sequence(dataset) else _pytree_len(dataset)


def _pytree_len(dataset) -> int:
  leaves = jax.tree.leaves(dataset)
  if not leaves:
    raise ValueError("dataset must contain at least one array, got an empty pytree")
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError("dataset arrays must have a leading example axis; got a scalar leaf")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"dataset arrays must share one leading size, got sizes {sorted(sizes)}")
  return sizes.pop()


def _stack(items: list) -> Any:
  try:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)
  except ValueError as err:
    raise ValueError("dataset items must all have the same structure and shapes to be "
                     f"stacked into a batch: {err}") from err


def gather(dataset: Any, indices: np.ndarray, mask: np.ndarray) -> Any:
  """The examples at ``indices`` stacked along a leading axis; padding filled by row 0.

  ``dataset`` is either a pytree of arrays sharing a leading example axis (a
  numpy/jax array, a dict or tuple of them: rows are taken by fancy indexing)
  or any other object with ``__len__`` and ``__getitem__`` (a list, a
  torch-style dataset) whose items are arrays or dicts/tuples of arrays (the
  items are fetched and stacked with numpy; padded slots are not fetched).

  Privacy: slots where ``mask`` is False hold a copy of example 0, so shapes
  and dtypes are valid for the model. They MUST be masked out of the gradient
  (pass ``mask`` to ``dpfl.clipped_grad``): unmasked, example 0 would
  contribute once per padded slot and exceed the stated sensitivity.

  Args:
    dataset: pytree of arrays or indexable dataset, with at least one example.
    indices: 1-D integer array (e.g. ``Batch.indices``).
    mask: bool array of the same shape; True marks real examples, whose
      indices must lie in [0, len(dataset)).

  Returns:
    The batch: the same structure as ``dataset`` (or its items) with leading
    axis ``len(indices)``.
  """
  indices = np.asarray(indices)
  mask = np.asarray(mask)
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} "
                     f"and dtype {indices.dtype}")
  if mask.shape != indices.shape or mask.dtype != np.bool_:
    raise ValueError(f"mask must be a bool array of shape {indices.shape} like indices, "
                     f"got shape {mask.shape} and dtype {mask.dtype}")
  sequence = _is_example_sequence(dataset)
  size = len(dataset) if sequence else _pytree_len(dataset)
  if size == 0:
    raise ValueError("dataset must contain at least one example, got an empty dataset")
  real = indices[mask]
  if real.size and (real.min() < 0 or real.max() >= size):
    raise ValueError(f"indices must lie in [0, {size}) where mask is True, got values in "
                     f"[{real.min()}, {real.max()}]")
  safe = np.where(mask, indices, 0)
  if not sequence:
    return jax.tree.map(lambda leaf: leaf[safe], dataset)
  filler = dataset[0]
  return _stack([dataset[int(i)] if keep else filler for i, keep in zip(safe, mask)])
