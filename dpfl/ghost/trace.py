"""Tracing a unit's loss: its equations, which values are data or
parameter-derived, the sites where they meet, and each parameter's strategy
(ghost, per-unit, fallback). See :mod:`dpfl.ghost`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from dpfl import explicit_sharding
from dpfl.ghost.norms import choose_form, gather_mode

PyTree = Any

# Calls whose body is pure and is evaluated inline (so its sites are seen).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}
# Parameter-only ops whose transpose is an isometry: the norm of a gradient
# with respect to their output equals the norm with respect to their input.
_ISOMETRIC = {"reshape", "transpose", "convert_element_type", "squeeze",
              "expand_dims", "copy", "copy_p", "slice", "rev",
              "sharding_constraint", "broadcast_in_dim"}
# Ops that may broadcast a parameter before an elementwise use (linear).
_LINEAR_SHAPE = _ISOMETRIC | {"broadcast_in_dim", "gather", "dynamic_slice",
                               "pad", "reduce_sum"}
_ELEMENTWISE = {"add", "add_any", "sub", "mul", "div", "max", "min",
                "select_n", "neg", "pow", "atan2", "rem"}
DATA_FREE_VJP = {"add", "add_any", "sub"}
LINEAR_IN_DATA = {"mul", "dot_general", "conv_general_dilated"}
_CONTROL_FLOW = {"scan", "while", "cond", "custom_jvp_call", "custom_vjp_call",
                 "custom_vjp_call_jaxpr", "shard_map", "pmap", "xla_pmap"}


# An elementwise-used parameter up to this size (a position table of
# 1024 x 1024) has its per-unit gradient formed as a matter of course;
# a larger one is reported as a fallback.
_SMALL_PER_UNIT = 2**20


class GhostFallbackWarning(UserWarning):
  """Some parameters' per-unit gradients had to be formed (still exact)."""


@dataclasses.dataclass(frozen=True)
class Site:
  """One place where a parameter meets data.

  Attributes:
    path: the parameter's path (``jax.tree_util.keystr``).
    primitive: the JAX primitive at the site (``dot_general``, ``gather``...).
    form: how the parameter's per-unit norm is computed there: ``"outer"``
      (one token: product of norms), ``"gram"`` (token Gram matrices),
      ``"explicit"`` (the per-unit gradient of this one layer is formed),
      ``"per_unit"`` (formed by JAX's VJP of the site: elementwise uses and
      fallbacks).
  """

  path: str
  primitive: str
  form: str


@dataclasses.dataclass(frozen=True)
class ClipReport:
  """How a clipped-gradient function computes its per-unit norms.

  Attributes:
    method: the clipping method used (what ``"auto"`` resolved to).
    ghost: paths of parameters whose per-unit norms come from the site's
      activations and output cotangents (no per-unit gradient formed).
    per_unit: paths of parameters used elementwise (biases, normalisation
      scales), whose small per-unit gradient is formed from the site.
    fallback: path -> reason, for parameters whose per-unit gradient had to
      be formed because ghost clipping cannot split their use (norms still
      exact).
    sites: every site, in trace order.
  """

  method: str
  ghost: tuple[str, ...] = ()
  per_unit: tuple[str, ...] = ()
  fallback: Mapping[str, str] = dataclasses.field(default_factory=dict)
  sites: tuple[Site, ...] = ()


class GhostUnsupported(ValueError):
  """The loss cannot be clipped by the ghost method (a clear reason)."""


# ---------------------------------------------------------------------------
# Tracing: a flat list of equations over integer value ids.


@dataclasses.dataclass
class _Node:
  prim: Any
  params: dict
  ins: list  # int ids, or ("lit", value)
  outs: list  # int ids
  avals: list  # out avals


@dataclasses.dataclass
class _Graph:
  nodes: list
  in_ids: list  # flat invars of the unit loss
  out_ids: list
  consts: dict  # id -> value
  avals: dict  # id -> aval


def _flatten(closed, in_ids, graph):
  jaxpr = closed.jaxpr if isinstance(closed, jex_core.ClosedJaxpr) else closed
  consts = closed.consts if isinstance(closed, jex_core.ClosedJaxpr) else ()
  env = {}

  def new(var):
    i = len(graph.avals)
    graph.avals[i] = var.aval
    return i

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = new(v)
    graph.consts[env[v]] = c
  for v, i in zip(jaxpr.invars, in_ids):
    env[v] = i

  def ref(v):
    if isinstance(v, jex_core.Literal):
      return ("lit", v.val)
    return env[v]

  for eqn in jaxpr.eqns:
    ins = [ref(v) for v in eqn.invars]
    in_avals = [v.aval for v in eqn.invars]
    key = _INLINE.get(eqn.primitive.name)
    if key is not None and key in eqn.params:
      outs = _flatten(eqn.params[key], ins, graph)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
      continue
    outs = [new(v) for v in eqn.outvars]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
    node = _Node(eqn.primitive, dict(eqn.params), ins, outs,
                 [v.aval for v in eqn.outvars])
    node.ins_avals = in_avals
    graph.nodes.append(node)
  return [ref(v) for v in jaxpr.outvars]


def bind_node(node: _Node, vals: list) -> list:
  out = node.prim.bind(*vals, **node.prim.get_bind_params(node.params))
  return list(out) if node.prim.multiple_results else [out]


def _is_float(aval) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.floating)


# ---------------------------------------------------------------------------
# Analysis.


@dataclasses.dataclass
class _SiteInfo:
  node_index: int
  param_pos: tuple  # operand positions of float parameter-derived inputs
  data_pos: tuple  # operand positions of data inputs
  out_pos: tuple  # float outputs (probed)
  leaves: frozenset
  kind: str  # dot | gather | conv | other
  primitive: str
  form: str = "per_unit"


@dataclasses.dataclass
class Analysis:
  graph: _Graph
  num_leaves: int
  leaf_ids: list
  data_ids: set
  param_leaves: dict  # id -> frozenset of leaves (parameter-derived values)
  sites: list
  ghost: dict  # leaf -> [(site index, chain ops)]: one site, or a tied pair
  generic_leaves: list  # leaves whose per-unit gradient is formed
  generic_sites: list  # site indices used by generic leaves
  report: ClipReport
  out_tree: Any
  # A grouped convolution anywhere: its batching rule mixes units (see
  # dpfl.clip_methods.unit_map), so per-unit passes isolate them.
  grouped_conv: bool = False
  # A parameter-only op that rounds (reduce_precision, a narrowing cast):
  # its transpose rounds the cotangent, so a VJP of scaled cotangents is
  # not the scaled sum of per-unit VJPs; fallback sums are then formed
  # from per-unit gradients.
  rounding: bool = False


def _chain(graph, producers, param_leaves, start, leaf_id):
  """The ops from ``leaf_id`` to ``start``, when each takes exactly one
  parameter-dependent input (its others constants); else None."""
  ops = []
  cur = start
  while cur != leaf_id:
    node = producers.get(cur)
    if node is None or len(node.outs) != 1:
      return None
    dependent = [i for i in node.ins
                 if not isinstance(i, tuple) and param_leaves.get(i)]
    if len(dependent) != 1:
      return None
    ops.append(node)
    cur = dependent[0]
  return ops[::-1]


def _tied_pair(graph, producers, param_leaves, sites, mine, leaf_id):
  """[(gather site, chain), (dot site, chain)] for tied embeddings, or None.

  A 2-D table E [V, D] looked up by rows (``E[ids]``) and also used as the
  output projection (``h @ E.T``, contracting D): the per-unit gradient is
  G = sum_t e_{id_t} g1_t^T + glog^T h, whose squared norm is the two
  sites' own plus the cross term 2 sum_{t,s} glog[s, id_t] (g1_t . h_s).
  """
  if len(mine) != 2:
    return None
  by_kind = {sites[s].kind: s for s in mine}
  if set(by_kind) != {"gather", "dot"}:
    return None
  shape = graph.avals[leaf_id].shape
  if len(shape) != 2:
    return None
  sg, sd = by_kind["gather"], by_kind["dot"]
  for s in (sg, sd):
    if len(sites[s].leaves) != 1 or len(sites[s].param_pos) != 1:
      return None
  gnode = graph.nodes[sites[sg].node_index]
  dnode = graph.nodes[sites[sd].node_index]
  cg = _chain(graph, producers, param_leaves, gnode.ins[0], leaf_id)
  p = sites[sd].param_pos[0]
  cd = _chain(graph, producers, param_leaves, dnode.ins[p], leaf_id)
  if cg is None or cd is None:
    return None
  if not all(op.prim.name in ("convert_element_type", "copy", "copy_p")
             and _isometric(op) for op in cg):
    return None
  if tuple(gnode.params["dimension_numbers"].start_index_map) != (0,):
    return None
  flips = 0
  for op in cd:
    if op.prim.name == "transpose" and tuple(op.params["permutation"]) == (1, 0):
      flips += 1
    elif not (op.prim.name in ("convert_element_type", "copy", "copy_p")
              and _isometric(op)):
      return None
  (lc, rc), (lb, rb) = dnode.params["dimension_numbers"]
  w_c, w_b = (rc, rb) if p == 1 else (lc, lb)
  d_axis = 1 if flips % 2 == 0 else 0
  if tuple(w_b) or tuple(w_c) != (d_axis,):
    return None
  return [(sg, cg), (sd, cd)]


def _simple_gather(node, param_pos) -> bool:
  if param_pos != (0,) or gather_mode(node) is None:
    return False
  dn = node.params["dimension_numbers"]
  if tuple(dn.operand_batching_dims) or tuple(dn.start_indices_batching_dims):
    return False
  shape = node.ins_avals[0].shape
  sizes = node.params["slice_sizes"]
  for d in range(len(shape)):
    if d in dn.start_index_map:
      if sizes[d] != 1 or d not in dn.collapsed_slice_dims:
        return False
    elif sizes[d] != shape[d] or d in dn.collapsed_slice_dims:
      return False
  return True


def analyze(unit_loss, params, unit_batch, unit_mask) -> Analysis:
  """Traces ``unit_loss(params, unit_batch, unit_mask)`` and finds its sites."""
  abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                     sharding=explicit_sharding.of(x)), t
  )
  closed, out_shape = jax.make_jaxpr(unit_loss, return_shape=True)(
      abstract(params), abstract(unit_batch), abstract(unit_mask)
  )
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
  num_leaves = len(paths)

  graph = _Graph([], [], [], {}, {})
  in_ids = []
  for v in closed.jaxpr.invars:
    i = len(graph.avals)
    graph.avals[i] = v.aval
    in_ids.append(i)
  graph.in_ids = in_ids
  graph.out_ids = _flatten(closed, in_ids, graph)
  leaf_ids = in_ids[:num_leaves]
  leaf_of = {i: k for k, i in enumerate(leaf_ids)}

  data_ids = set(in_ids[num_leaves:])
  param_leaves: dict[int, frozenset] = {
      i: frozenset([leaf_of[i]]) for i in leaf_ids
  }
  for i in graph.consts:
    param_leaves[i] = frozenset()
  producers = {}
  sites: list[_SiteInfo] = []
  for n, node in enumerate(graph.nodes):
    for o in node.outs:
      producers[o] = node
    is_data = [not isinstance(i, tuple) and i in data_ids for i in node.ins]
    leaves = frozenset().union(
        *(param_leaves[i] for i in node.ins if not isinstance(i, tuple) and i in param_leaves)
    )
    if node.prim.name == "stop_gradient":
      leaves = frozenset()
    if not any(is_data):
      for o in node.outs:
        param_leaves[o] = leaves
      continue
    data_ids.update(node.outs)
    param_pos = tuple(
        p for p, i in enumerate(node.ins)
        if not isinstance(i, tuple) and i in param_leaves and param_leaves[i]
        and _is_float(graph.avals[i])
    )
    out_pos = tuple(p for p, a in enumerate(node.avals) if _is_float(a))
    if not param_pos or not out_pos or node.prim.name == "stop_gradient":
      continue
    site_leaves = frozenset().union(*(param_leaves[node.ins[p]] for p in param_pos))
    name = node.prim.name
    kind = "other"
    if name == "dot_general" and len(param_pos) == 1:
      kind = "dot"
    elif name == "gather" and _simple_gather(node, param_pos):
      kind = "gather"
    elif (name == "conv_general_dilated" and param_pos == (1,)
          and node.params.get("batch_group_count", 1) == 1):
      kind = "conv"
    elif name in _ELEMENTWISE:
      kind = "elementwise"
    sites.append(_SiteInfo(
        n, param_pos, tuple(p for p, d in enumerate(is_data) if d), out_pos,
        site_leaves, kind, name,
    ))

  loss_id = graph.out_ids[0]
  if not isinstance(loss_id, tuple) and loss_id not in data_ids and param_leaves.get(loss_id):
    raise GhostUnsupported(
        "method='ghost': the loss does not depend on the unit's data, so it"
        " has no per-unit structure to exploit; use method='materialize'."
    )

  # Leaf strategies.
  sites_of = {k: [] for k in range(num_leaves)}
  for s, site in enumerate(sites):
    for k in site.leaves:
      sites_of[k].append(s)
  for k in range(num_leaves):
    if sites_of[k] and not _is_float(graph.avals[leaf_ids[k]]):
      raise ValueError(
          f"parameter {paths[k]} has dtype {graph.avals[leaf_ids[k]].dtype} and the"
          " loss depends on it: gradients need floating parameters (pass it in the"
          " batch, or close over it)."
      )
  ghost, generic, fallback, per_unit = {}, [], {}, []
  for k in range(num_leaves):
    mine = sites_of[k]
    if not mine:
      continue
    if len(mine) > 1:
      pair = _tied_pair(graph, producers, param_leaves, sites, mine, leaf_ids[k])
      if pair is not None:
        ghost[k] = pair
        continue
      prims = ", ".join(sites[s].primitive for s in mine)
      generic.append(k)
      fallback[paths[k]] = f"used at {len(mine)} places ({prims}); the norm of the sum is formed per unit"
      continue
    site = sites[mine[0]]
    node = graph.nodes[site.node_index]
    if len(site.leaves) > 1:
      generic.append(k)
      others = sorted(paths[j] for j in site.leaves if j != k)
      fallback[paths[k]] = f"combined with {', '.join(others)} before {site.primitive}"
      continue
    chain = _chain(graph, producers, param_leaves, node.ins[site.param_pos[0]], leaf_ids[k]) if len(site.param_pos) == 1 else None
    if site.kind in ("dot", "gather", "conv"):
      if chain is not None and all(_isometric(op) for op in chain):
        ghost[k] = [(mine[0], chain)]
        continue
      generic.append(k)
      why = ("through " + ", ".join(sorted({op.prim.name for op in chain if not _isometric(op)}))
             if chain else "through a computation of several values")
      fallback[paths[k]] = (f"reaches {site.primitive} {why} (only plain reshapes, transposes,"
                            " casts and slices keep a gradient's norm)")
      continue
    generic.append(k)
    if site.kind == "elementwise" and chain is not None and all(
        op.prim.name in _LINEAR_SHAPE for op in chain
    ) and math.prod(graph.avals[leaf_ids[k]].shape) <= _SMALL_PER_UNIT:
      per_unit.append(paths[k])
    elif site.primitive in _CONTROL_FLOW:
      fallback[paths[k]] = f"used inside {site.primitive} (control flow or a custom derivative)"
    elif site.kind == "elementwise" and chain is not None and all(
        op.prim.name in _LINEAR_SHAPE for op in chain):
      size = math.prod(graph.avals[leaf_ids[k]].shape)
      fallback[paths[k]] = (
          f"used elementwise by {site.primitive}: its per-unit gradient"
          f" ({size} elements) is formed")
    elif site.kind == "elementwise":
      ops = sorted({op.prim.name for op in chain}) if chain else ["several values"]
      fallback[paths[k]] = f"used by {site.primitive} through {', '.join(ops)} (a nonlinear function of the parameter)"
    else:
      fallback[paths[k]] = f"used by {site.primitive}, which ghost clipping does not cover"

  generic_sites = sorted({s for k in generic for s in sites_of[k]})
  for s, site in enumerate(sites):
    site.form = "per_unit"
  for k, entries in ghost.items():
    for s, _ in entries:
      sites[s].form = choose_form(graph, sites[s])
  report_sites = []
  for s, site in enumerate(sites):
    for k in sorted(site.leaves):
      report_sites.append(Site(paths[k], site.primitive, site.form))
  report = ClipReport(
      method="ghost",
      ghost=tuple(paths[k] for k in sorted(ghost)),
      per_unit=tuple(per_unit),
      fallback=dict(fallback),
      sites=tuple(report_sites),
  )
  return Analysis(
      graph=graph, num_leaves=num_leaves, leaf_ids=leaf_ids, data_ids=data_ids,
      param_leaves=param_leaves, sites=sites, ghost=ghost,
      generic_leaves=sorted(generic), generic_sites=generic_sites,
      report=report, out_tree=out_shape,
      grouped_conv=has_grouped_conv(closed.jaxpr),
      rounding=any(
          _rounds(node) for node in graph.nodes
          if not any(not isinstance(i, tuple) and i in data_ids for i in node.ins)
      ),
  )


def has_grouped_conv(jaxpr) -> bool:
  """Whether a jaxpr (sub-jaxprs included) holds a grouped convolution.

  Under ``vmap``, JAX 0.10.2 batches a grouped convolution's kernel
  gradient in a way that mixes units (one unit's NaN reaches all), the
  one such batching rule known to us; ``dpfl.clip_methods.unit_map``
  isolates units where this returns True.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated" and (
        eqn.params.get("feature_group_count", 1) > 1
        or eqn.params.get("batch_group_count", 1) > 1):
      return True
    for value in eqn.params.values():
      for sub in sub_jaxprs(value):
        if has_grouped_conv(sub):
          return True
  return False


def sub_jaxprs(value):
  """The jaxprs in an equation parameter (nested tuples included)."""
  if isinstance(value, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from sub_jaxprs(v)


def _rounds(node) -> bool:
  if node.prim.name == "reduce_precision":
    return True
  if node.prim.name == "convert_element_type":
    src, dst = node.ins_avals[0], node.avals[0]
    return (_is_float(src) and _is_float(dst)
            and jnp.finfo(dst.dtype).bits < jnp.finfo(src.dtype).bits)
  return False


def _isometric(node) -> bool:
  name = node.prim.name
  if name not in _ISOMETRIC or len(node.ins) != 1:
    return False
  if name == "broadcast_in_dim":
    return math.prod(node.ins_avals[0].shape) == math.prod(node.avals[0].shape)
  if name == "convert_element_type":
    return _is_float(node.ins_avals[0]) and _is_float(node.avals[0])
  if name == "reshape":  # order="F" reshapes permute (dimensions=...)
    return node.params.get("dimensions") is None
  return True
