"""The cost model behind ``method="auto"``: each clipping method's extra
cost per unit over a plain step, from the loss's traced shapes alone."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from dpfl import ghost
from dpfl.clip_methods import PyTree, UnitLoss, has_half_precision, num_parameters


def matmul_flops(jaxpr: jex_core.Jaxpr) -> float:
  """FLOPs of the dot_general / conv ops in a jaxpr (sub-jaxprs included).

  A static estimate: a ``while`` body counts once, a ``cond`` counts its
  most expensive branch, a ``scan`` body counts ``length`` times.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's own jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      contracted = math.prod(lhs_shape[d] for d in lhs_contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
    elif name == "conv_general_dilated":
      rhs_shape = eqn.invars[1].aval.shape
      out_features = rhs_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += (
          2.0
          * math.prod(eqn.outvars[0].aval.shape)
          * math.prod(rhs_shape)
          / max(1, out_features)
      )
    subs = [
        matmul_flops(j)
        for v in eqn.params.values()
        for j in ghost.sub_jaxprs(v)
    ]
    if subs:
      if name == "cond":
        total += max(subs)
      elif name == "scan":
        total += eqn.params["length"] * sum(subs)
      else:
        total += sum(subs)
  return total


def _node_flops(node) -> float:
  """Matmul FLOPs inside an equation's sub-jaxprs (scan bodies x length)."""
  subs = [matmul_flops(j) for v in node.params.values() for j in ghost.sub_jaxprs(v)]
  if not subs:
    return 0.0
  if node.prim.name == "cond":
    return max(subs)
  if node.prim.name == "scan":
    return node.params["length"] * sum(subs)
  return sum(subs)


# FLOPs one byte of memory traffic is worth, for the cost model below (a
# CPU streams a few GB/s per core and multiplies tens of GFLOP/s).
BYTES_COST = 6.0
# Bytes of traffic per element of a per-unit gradient that is formed and
# then reduced: written, read for the norm, read again for the weighted
# sum, plus the allocator's and cache misses' share (calibrated on
# benchmarks/clipping.py: materialize's extra time over a plain step is
# about 2x what 12 bytes predicts on the MLP and the transformer).
GRAD_BYTES = 24.0


def method_costs(
    unit_loss: UnitLoss, params: PyTree, unit_batch: PyTree, unit_mask: Any
) -> dict[str, float]:
  """Per-unit cost of each method beyond a plain step, in FLOP-equivalents.

  ``materialize`` writes, reads and sums each unit's gradient:
  ``GRAD_BYTES`` per parameter. ``reweight`` adds a forward+backward pass (~3x the unit's
  matmul FLOPs) and reduces each unit's gradient in cache (~4 bytes per
  parameter); it needs float32+ parameters. ``ghost`` pays the norm
  arithmetic of its sites and the traffic of its records (see
  ``dpfl.ghost.extra_cost``); absent when the loss cannot be traced for it.
  """
  abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t
  )
  params, unit_batch, unit_mask = abstract((params, unit_batch, unit_mask))
  jaxpr = jax.make_jaxpr(unit_loss)(params, unit_batch, unit_mask)
  flops = matmul_flops(jaxpr.jaxpr)
  num = max(1, num_parameters(params))
  costs = {"materialize": BYTES_COST * GRAD_BYTES * num}
  if not has_half_precision(params):
    costs["reweight"] = 3.0 * flops + BYTES_COST * 4.0 * num
  try:
    analysis = ghost.analyze(unit_loss, params, unit_batch, unit_mask)
  except ghost.GhostUnsupported:
    return costs
  costs["ghost"] = ghost.extra_cost(analysis, BYTES_COST, GRAD_BYTES, _node_flops)
  return costs


def choose_method(
    unit_loss: UnitLoss, params: PyTree, unit_batch: PyTree, unit_mask: Any
) -> str:
  """The method of least estimated cost (:func:`method_costs`).

  A dense layer on single examples costs ghost two products of norms and
  materialize a whole per-unit gradient: ghost. A sequence model costs ghost
  token Gram matrices, usually far less than a per-unit gradient (Bu et
  al. 2023); long sequences through narrow layers switch those layers to
  the explicit per-layer gradient. A loss whose parameters mostly sit in
  control flow (a ``scan`` over layers) gains nothing from ghost and takes
  materialize. Ties go to ghost, then materialize. ``unit_batch`` /
  ``unit_mask`` describe one unit (arrays or ``jax.ShapeDtypeStruct``s).
  """
  costs = method_costs(unit_loss, params, unit_batch, unit_mask)
  order = ("ghost", "materialize", "reweight")
  return min((m for m in order if m in costs), key=lambda m: (costs[m], order.index(m)))
