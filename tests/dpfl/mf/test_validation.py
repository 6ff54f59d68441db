"""Bad arguments raise ValueError naming the argument and its range."""

import pytest

import dpfl.mf as mf


@pytest.mark.parametrize("call,match", [
    (lambda: mf.identity(0), r"num_steps must be an integer >= 1, got 0"),
    (lambda: mf.sqrt_toeplitz(-3), r"num_steps"),
    (lambda: mf.optimize_blt(2.5, buffers=2), r"num_steps"),
    (lambda: mf.optimize_banded(16, bands=0), r"bands must be an integer in \[1, 16\]"),
    (lambda: mf.optimize_banded(16, bands=17), r"bands must be an integer in \[1, 16\]"),
    (lambda: mf.optimize_banded(16, bands=5, participation=(4, 4)),
     r"bands must be <= min_separation=4"),
    (lambda: mf.optimize_blt(16, buffers=0), r"buffers must be an integer in \[1, 32\]"),
    (lambda: mf.optimize_blt(16, buffers=-1), r"buffers"),
    (lambda: mf.participation(12, num_participations=5, min_separation=2),
     r"num_participations \* min_separation must equal num_steps=12"),
    (lambda: mf.participation(12, num_participations=0), r"num_participations must be an integer"),
    (lambda: mf.participation(12, num_participations=5), r"num_participations must divide"),
    (lambda: mf.participation(12, min_separation=5), r"min_separation must divide"),
    (lambda: mf.identity(12, participation=(3, 3)), r"num_participations \* min_separation"),
    (lambda: mf.identity(12, participation=3), r"participation must be None or a"),
    (lambda: mf.optimize_dense(8, objective="median"), r"objective must be one of max, mean"),
    (lambda: mf.Workload(8, momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lambda: mf.Workload(3, learning_rates=(1.0, 0.0, 1.0)), r"learning_rates must be"),
    (lambda: mf.optimize_blt(8, workload=mf.Workload(8, learning_rates=(1, 2) * 4)),
     r"workload must be Toeplitz"),
    (lambda: mf.identity(8, workload=mf.Workload(9)), r"workload.num_steps must equal"),
    (lambda: mf.tree(10_000), r"num_steps must be <= 8192"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_strategy_values_are_frozen():
  s = mf.optimize_blt(16, buffers=2)
  with pytest.raises(Exception):
    s.num_steps = 3
  with pytest.raises(ValueError):
    s.buffer_decay[0] = 0.5
  with pytest.raises(ValueError):
    s.matrix[0, 0] = 2.0
