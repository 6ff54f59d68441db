"""Sharded sweeps: the I-th of N disjoint, cost-balanced parts of a sweep's run list.

``dpfl sweep --shard I/N`` runs one part per job of a job array (any cluster
scheduler) into its own results file, and ``dpfl fit`` merges the files
(``results.read_inputs``). A part is a function of the set of runs and N
only, so every job computes the same partition without talking to the
others, and a run's configuration (seed included) is the one it has in the
unsharded sweep: the shards together are the unsharded sweep.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Sequence

from accounting import validate as check
from dpfl.scaling import models

if TYPE_CHECKING:
  from dpfl.scaling.sweep import RunConfig


def estimated_cost(config: RunConfig) -> float:
  """Relative cost of a run, for balancing shards: 6·N·T·B·seq, ×2 when private.

  The training FLOPs of the run (``models.training_flops``); a private step
  costs about twice a non-private one here (per-example clipping: 1.7× in
  the README's measurement). A user-level batch counts users: it is charged
  ``examples_per_user`` sequences each (the cap, an upper bound). Only the
  ratios between runs matter.
  """
  examples = config.batch_size * (config.examples_per_user
                                  if config.privacy_unit == "user" else 1)
  flops = models.training_flops(params=models.params_count(config.model),
                                num_steps=config.steps, batch_size=examples,
                                seq_len=config.seq_len)
  return flops * (2.0 if config.private else 1.0)


def shard_configs(configs: Sequence[RunConfig], index: int, count: int) -> list[RunConfig]:
  """The ``index``-th (1-based) of ``count`` disjoint parts of a sweep's run list.

  The parts are a deterministic function of the set of runs and ``count``
  only (not of the list's order, nor of which shards ran, or when): the
  runs, most expensive first (``estimated_cost``; ties by their sorted
  configuration text), each go to the part with the least cost so far
  (ties: the lowest index): the greedy longest-processing-time rule, whose
  largest part is within 4/3 of the best possible. Every
  run is in exactly one part; a part keeps grid order, and may be empty when
  ``count`` exceeds the runs. A run's configuration (its seed included) does
  not depend on the part it is in, so the shards' results together are the
  unsharded sweep's.

  Args:
    configs: the whole grid (e.g. ``make_grid(...)``); duplicates count once.
    index: which part, in [1, count].
    count: the number of parts, >= 1.
  """
  count = check.integer("count", count, low=1)
  index = check.integer("index", index, low=1, high=count)
  configs = list(dict.fromkeys(configs))
  order = sorted(range(len(configs)), key=lambda i: (
      -estimated_cost(configs[i]), json.dumps(configs[i].key(), sort_keys=True)))
  loads = [0.0] * count
  part_of = {}
  for i in order:
    part = min(range(count), key=lambda p: (loads[p], p))
    loads[part] += estimated_cost(configs[i])
    part_of[i] = part
  return [c for i, c in enumerate(configs) if part_of[i] == index - 1]
