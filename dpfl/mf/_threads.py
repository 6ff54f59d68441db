"""BLAS threading for the optimizers.

Strategy optimization makes many small or mid-sized BLAS calls (blocked
triangular solves, ``(bands + 2)``-sized matmuls, one eigendecomposition per
dense iteration). Extra BLAS threads only add synchronization there, and on a
shared machine a waiting thread costs a scheduler quantum per call: measured
on 2 busy cores, pinning BLAS to one thread made banded optimization 2-60x
and dense 3-13x faster. When ``threadpoolctl`` is installed the optimizers
run under ``one_blas_thread()``; without it they run as configured.
"""

from __future__ import annotations

import contextlib


def one_blas_thread():
  """A context manager limiting BLAS to one thread (a no-op without threadpoolctl)."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    return contextlib.nullcontext()
  return threadpool_limits(limits=1, user_api="blas")


def blas_pinned(fn):
  """Decorator: run ``fn`` under ``one_blas_thread()``."""
  import functools

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with one_blas_thread():
      return fn(*args, **kwargs)

  return wrapped
