"""Ghost (book-keeping) clipping for any JAX loss: per-unit gradient norms
without per-unit gradients.

The method, after Goodfellow (2015), Li et al. (2022, "ghost clipping") and
Bu et al. (2023, "book-keeping"), but found by tracing the loss instead of
hooking known layer classes:

1. :func:`analyze` traces one unit's loss to a jaxpr (``jit``/``checkpoint``
   calls inlined) and classifies every value as *data* (depends on the
   unit's batch) or *parameter-derived* (depends on the parameters only). A
   **site** is an equation where a parameter-derived value meets data: a
   dense layer's ``dot_general``, an embedding ``gather``, a
   ``conv_general_dilated``, a bias ``add``, a LayerNorm scale ``mul`` ...
2. One forward pass of all units (``vmap``) records every site's data
   operands, and one backward pass with respect to zero *probes* added to the
   site outputs gives every unit's output cotangent at every site. No
   parameter gradient is formed in this pass.
3. Per-unit norms. A parameter used at exactly one ``dot_general`` /
   ``gather`` / ``conv`` site, reached through reshapes, transposes, casts and
   slices only (these keep the norm), gets its norm from the site alone:
   for ``dot_general`` the per-unit weight gradient is ``A^T g`` summed over
   the unit's tokens, whose squared norm is the Gram form
   ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` or, when cheaper (long sequences,
   narrow layers), the explicit ``||A^T g||^2``, chosen per site as
   book-keeping clipping does; for an embedding lookup it is
   ``sum_{t,s} [id_t == id_s] (g_t . g_s)``; for a convolution the (small)
   per-unit kernel gradient is formed. Every other parameter, i.e. used
   elementwise (biases, normalisation scales; cheap), used twice (tied
   embeddings), combined with another parameter or passed through a
   nonlinear function before use, or used inside control flow / a custom
   derivative, gets its per-unit gradient formed **for that parameter
   only**, by JAX's own VJP of its sites given the recorded data and
   cotangents. The last group is reported as *fallback*
   (:class:`ClipReport`, and a :class:`GhostFallbackWarning` at trace time);
   its norms are exact, never approximated.
4. The clipped sum ``sum_i w_i g_i`` is linear in the cotangents, so it is
   computed from the same records with cotangents scaled by the clip
   weights (one more "weight-gradient" pass; no second forward/backward).

Norms are accumulated in float32 (or wider) at the highest matmul
precision; the sum of a half-precision parameter is accumulated in float32.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST

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
_DATA_FREE_VJP = {"add", "add_any", "sub"}
_LINEAR_IN_DATA = {"mul", "dot_general", "conv_general_dilated"}
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


def _bind(node: _Node, vals: list) -> list:
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


def _gather_mode(node) -> str | None:
  """The gather's out-of-bounds mode, as its gradient treats it."""
  mode = str(node.params.get("mode", "")).upper()
  for name in ("FILL_OR_DROP", "PROMISE_IN_BOUNDS", "CLIP"):
    if name in mode:
      return name.lower()
  return None


def _simple_gather(node, param_pos) -> bool:
  if param_pos != (0,) or _gather_mode(node) is None:
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
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t
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
      sites[s].form = _choose_form(graph, sites[s])
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
      for sub in _subs(value):
        if has_grouped_conv(sub):
          return True
  return False


def _subs(value):
  if isinstance(value, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subs(v)


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


# ---------------------------------------------------------------------------
# dot_general in canonical form: A [nb, N, C], g [nb, N, F].


def _dot_layout(node, p):
  """Axis bookkeeping for a dot_general whose operand ``p`` is the parameter."""
  (lc, rc), (lb, rb) = node.params["dimension_numbers"]
  lhs, rhs = node.ins_avals[0].shape, node.ins_avals[1].shape
  if p == 1:
    a_shape, a_c, a_b, w_shape, w_c, w_b = lhs, lc, lb, rhs, rc, rb
  else:
    a_shape, a_c, a_b, w_shape, w_c, w_b = rhs, rc, rb, lhs, lc, lb
  a_free = [d for d in range(len(a_shape)) if d not in a_c and d not in a_b]
  w_free = [d for d in range(len(w_shape)) if d not in w_c and d not in w_b]
  nb = math.prod(a_shape[d] for d in a_b)
  n = math.prod(a_shape[d] for d in a_free)
  c = math.prod(a_shape[d] for d in a_c)
  f = math.prod(w_shape[d] for d in w_free)
  nbd = len(a_b)
  # Output (g) axes: batch, lhs free, rhs free.
  if p == 1:
    g_perm = list(range(nbd)) + list(range(nbd, nbd + len(a_free))) + list(
        range(nbd + len(a_free), nbd + len(a_free) + len(w_free)))
  else:
    g_perm = list(range(nbd)) + list(
        range(nbd + len(w_free), nbd + len(w_free) + len(a_free))) + list(
        range(nbd, nbd + len(w_free)))
  a_perm = list(a_b) + a_free + list(a_c)
  # Canonical result [batch dims..., contract dims..., free dims...] -> W axes.
  canon = list(w_b) + list(w_c) + w_free
  w_perm = [canon.index(d) for d in range(len(w_shape))]
  canon_shape = tuple(w_shape[d] for d in canon)
  return dict(a_perm=a_perm, g_perm=g_perm, nb=nb, n=n, c=c, f=f,
              w_perm=w_perm, canon_shape=canon_shape)


def _choose_form(graph, site) -> str:
  node = graph.nodes[site.node_index]
  if site.kind == "dot":
    lay = _dot_layout(node, site.param_pos[0])
    if lay["n"] == 1:
      return "outer"
    return "gram" if lay["n"] * (lay["c"] + lay["f"]) <= lay["c"] * lay["f"] else "explicit"
  if site.kind == "gather":
    return "gram"
  return "explicit"


def _canon_dot(node, p, a, g):
  """a [U, *a_shape], g [U, *out] -> [U, nb, N, C], [U, nb, N, F]."""
  lay = _dot_layout(node, p)
  u = a.shape[0]
  a = jnp.transpose(a, [0] + [d + 1 for d in lay["a_perm"]]).reshape(
      u, lay["nb"], lay["n"], lay["c"])
  g = jnp.transpose(g, [0] + [d + 1 for d in lay["g_perm"]]).reshape(
      u, lay["nb"], lay["n"], lay["f"])
  return a, g, lay


def _f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sq_sum(x):
  x = _f32(x)
  return jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)


def _dot_sq_norms(form, a, g):
  if form == "outer":  # one token: ||a g^T||^2 = ||a||^2 ||g||^2
    sa = jnp.sum(jnp.square(_f32(a)), axis=(2, 3))
    sg = jnp.sum(jnp.square(_f32(g)), axis=(2, 3))
    return jnp.sum(sa * sg, axis=1)
  if form == "gram":
    ga = jnp.einsum("bkic,bkjc->bkij", a, a, precision=HIGHEST,
                    preferred_element_type=jnp.float32)
    gg = jnp.einsum("bkif,bkjf->bkij", g, g, precision=HIGHEST,
                    preferred_element_type=jnp.float32)
    return jnp.sum(ga * gg, axis=(1, 2, 3))
  grads = jnp.einsum("bkic,bkif->bkcf", a, g, precision=HIGHEST,
                     preferred_element_type=jnp.float32)
  return jnp.sum(jnp.square(grads), axis=(1, 2, 3))


def _gather_canon(node, idx, g):
  """idx [U, *batch, K], g [U, *out] -> idx [U, L, K], valid [U, L], g [U, L, D].

  L lookups per unit; an out-of-bounds lookup is dropped (fill mode) or
  clamped (clip mode), as the gather and its transpose do.
  """
  dn = node.params["dimension_numbers"]
  u = g.shape[0]
  out_nd = g.ndim - 1
  offset = list(dn.offset_dims)
  batch_axes = [d for d in range(out_nd) if d not in offset]
  g = jnp.transpose(g, [0] + [d + 1 for d in batch_axes + offset])
  nlook = math.prod(g.shape[1:1 + len(batch_axes)])
  g = g.reshape(u, nlook, -1)
  idx = idx.reshape(u, nlook, -1)  # index_vector_dim is last
  shape = node.ins_avals[0].shape
  dims = list(dn.start_index_map)
  limit = jnp.asarray([shape[d] - 1 for d in dims], idx.dtype)
  if _gather_mode(node) == "clip":
    idx = jnp.clip(idx, 0, limit)
    valid = jnp.ones(idx.shape[:2], bool)
  else:
    # fill_or_drop, and promise_in_bounds (``E[ids]``): the forward pass
    # may read a clamped row, but the gradient (a scatter-add) drops an
    # out-of-range lookup, so its cotangent is in no unit's gradient.
    valid = jnp.all((idx >= 0) & (idx <= limit), axis=-1)
  return idx, valid, g


def _gather_sq_norms(node, idx, g):
  """Token-equality Gram: sum_{t,s} [id_t == id_s] (g_t . g_s)."""
  idx, valid, g = _gather_canon(node, idx, g)
  same = jnp.all(idx[:, :, None, :] == idx[:, None, :, :], axis=-1)
  same = same & valid[:, :, None] & valid[:, None, :]
  gg = jnp.einsum("bif,bjf->bij", g, g, precision=HIGHEST,
                  preferred_element_type=jnp.float32)
  return jnp.sum(jnp.where(same, gg, 0.0), axis=(1, 2))


def _tied_cross(gnode, idx, g1, dnode, p, h, glog):
  """2 <G_gather, G_dot> = 2 sum_{t,s} glog[s, id_t] (g1_t . h_s) per unit."""
  idx, valid, g1 = _gather_canon(gnode, idx, g1)
  a, g, _ = _canon_dot(dnode, p, h, glog)  # [U, 1, N, D], [U, 1, N, V]
  a, g = a[:, 0], g[:, 0]
  ids = jnp.broadcast_to(idx[:, None, :, 0], (g.shape[0], g.shape[1], idx.shape[1]))
  m = jnp.take_along_axis(g, ids, axis=2)  # [U, N (s), L (t)]
  prod = jnp.einsum("btd,bsd->bst", g1, a, precision=HIGHEST,
                    preferred_element_type=jnp.float32)
  cross = jnp.where(valid[:, None, :], _f32(m) * prod, 0.0)
  return 2.0 * jnp.sum(cross, axis=(1, 2))


def _pullback_isometric(chain, ct):
  """The transpose of a chain of isometric ops, applied to ``ct`` (float32)."""
  for node in reversed(chain):
    name = node.prim.name
    in_shape = node.ins_avals[0].shape
    if name == "transpose":
      perm = node.params["permutation"]
      ct = jnp.transpose(ct, np.argsort(perm))
    elif name == "slice":
      start = node.params["start_indices"]
      strides = node.params["strides"] or (1,) * len(in_shape)
      out_shape = node.avals[0].shape
      config = []
      for d in range(len(in_shape)):
        last = start[d] + (out_shape[d] - 1) * strides[d] if out_shape[d] else start[d] - 1
        config.append((start[d], in_shape[d] - 1 - last, strides[d] - 1))
      ct = jax.lax.pad(ct, jnp.zeros((), ct.dtype), config)
    elif name == "rev":
      ct = jax.lax.rev(ct, node.params["dimensions"])
    else:  # reshape, squeeze, expand_dims, size-preserving broadcast, casts
      ct = ct.reshape(in_shape)
  return ct


# ---------------------------------------------------------------------------
# Evaluation.


def _read(env, i):
  return i[1] if isinstance(i, tuple) else env[i]


def param_values(an: Analysis, leaves: list) -> dict:
  """Every parameter-derived (or constant) value, from the parameter leaves."""
  env = dict(an.graph.consts)
  for i, x in zip(an.leaf_ids, leaves):
    env[i] = x
  for node in an.graph.nodes:
    if any(not isinstance(i, tuple) and i in an.data_ids for i in node.ins):
      continue
    if all(o not in an.param_leaves for o in node.outs):
      continue
    outs = _bind(node, [_read(env, i) for i in node.ins])
    for o, v in zip(node.outs, outs):
      env[o] = v
  return env


def _unit_forward(an: Analysis, penv, probes, unit_inputs):
  """One unit's loss, with probes added at site outputs; records site data."""
  env = dict(penv)
  for i, x in zip(an.graph.in_ids[an.num_leaves:], unit_inputs):
    env[i] = x
  site_at = {site.node_index: s for s, site in enumerate(an.sites)}
  records = [None] * len(an.sites)
  for n, node in enumerate(an.graph.nodes):
    if not any(not isinstance(i, tuple) and i in an.data_ids for i in node.ins):
      continue
    vals = [_read(env, i) for i in node.ins]
    outs = _bind(node, vals)
    s = site_at.get(n)
    if s is not None:
      site = an.sites[s]
      records[s] = tuple(vals[p] for p in site.data_pos)
      for k, p in enumerate(site.out_pos):
        outs[p] = outs[p] + probes[s][k]
    for o, v in zip(node.outs, outs):
      env[o] = v
  outs = [_read(env, i) for i in an.graph.out_ids]
  return outs, records


def _site_apply(an, s, penv, data):
  """Site s's float outputs, from parameter values and one unit's data."""
  site = an.sites[s]
  node = an.graph.nodes[site.node_index]
  vals = []
  it = iter(data)
  for p, i in enumerate(node.ins):
    if p in site.data_pos:
      vals.append(next(it))
    else:
      vals.append(_read(penv, i))
  outs = _bind(node, vals)
  return [outs[p] for p in site.out_pos]


def _scaled(w, x):
  """w (per unit) * x, where w == 0 gives exact 0 (x may be NaN)."""
  wx = _f32(x) * w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(_f32(x).dtype)
  return jnp.where(w.reshape(w.shape + (1,) * (x.ndim - 1)) > 0, wx, 0.0)


def block(an: Analysis, params, units, included, l2_clip_norm, chunk_units,
          clip_weights, take_valid_or_donor, map_reduce, sum_sharding,
          unit_map):
  """The clipped sum and per-unit statistics of one block of units."""
  leaves = jax.tree.leaves(params)
  penv = param_values(an, leaves)
  batch, mask = units
  flat_inputs = jax.tree.leaves((batch, mask))
  n = included.shape[0]
  def zeros(aval):
    # Broadcast from the unit axis so that the probes are sharded as the
    # batch is (vmap wants every mapped input sharded alike).
    z = jnp.zeros_like(included, dtype=aval.dtype)
    return jax.lax.broadcast_in_dim(z, (n,) + tuple(aval.shape), (0,))

  probes = [
      tuple(zeros(an.graph.nodes[site.node_index].avals[p]) for p in site.out_pos)
      for site in an.sites
  ]

  def unit_pass(pr, *inputs):
    # One unit: its loss and records, and its cotangents at every site
    # (the gradient of its loss with respect to the probes).
    def loss_of(pr):
      outs, recs = _unit_forward(an, penv, pr, inputs)
      return outs[0], (outs, recs)

    _, pull, (outs, recs) = jax.vjp(loss_of, pr, has_aux=True)
    (cots,) = pull(jnp.ones((), outs[0].dtype))
    return outs, recs, cots

  def finite(result):
    outs, _, cots = result
    ok = jnp.isfinite(outs[0])
    for c in jax.tree.leaves(cots):
      ok = ok & jnp.all(jnp.isfinite(c).reshape(n, -1), axis=1)
    return ok

  outs, recs, cots = unit_map(unit_pass, (probes, *flat_inputs), finite,
                              isolate=an.grouped_conv)
  loss0 = outs[0]
  values = loss0
  aux = jax.tree.unflatten(jax.tree.structure(an.out_tree), outs)[1]

  sq = jnp.zeros((n,), jnp.float32)
  explicit = {}
  ghost_sites = [(k, s, chain) for k, entries in an.ghost.items()
                 for s, chain in entries]
  for k, s, chain in ghost_sites:
    site = an.sites[s]
    node = an.graph.nodes[site.node_index]
    if site.kind == "dot":
      p = site.param_pos[0]
      a, g, _ = _canon_dot(node, p, recs[s][0], cots[s][0])
      if site.form == "explicit":
        grads = jnp.einsum("bkic,bkif->bkcf", a, g, precision=HIGHEST,
                           preferred_element_type=jnp.float32)
        explicit[s] = grads
        sq = sq + jnp.sum(jnp.square(grads), axis=(1, 2, 3))
      else:
        sq = sq + _dot_sq_norms(site.form, a, g)
    elif site.kind == "gather":
      sq = sq + _gather_sq_norms(node, recs[s][0], cots[s][0])
    else:  # conv: the per-unit kernel gradient (small) is formed.
      def unit_grad(data, cot, s=s, node=node):
        wp = penv[node.ins[1]]
        f = lambda w: _site_apply(an, s, {**penv, node.ins[1]: w}, data)
        return jax.vjp(f, wp)[1](list(cot))[0]
      grads = unit_map(unit_grad, (recs[s], cots[s]),
                       lambda x: jnp.isfinite(_sq_sum(x)), isolate=an.grouped_conv)
      explicit[s] = grads
      sq = sq + _sq_sum(grads)
  for k, entries in an.ghost.items():
    if len(entries) == 2:  # tied embedding: the two sites' cross term
      (sg, _), (sd, _) = entries
      gnode = an.graph.nodes[an.sites[sg].node_index]
      dnode = an.graph.nodes[an.sites[sd].node_index]
      sq = sq + _tied_cross(gnode, recs[sg][0], cots[sg][0], dnode,
                            an.sites[sd].param_pos[0], recs[sd][0], cots[sd][0])

  generic = an.generic_leaves
  gsites = an.generic_sites

  def generic_unit_grads(sub_leaves, data, cot):
    def f(sub):
      full = list(leaves)
      for k, x in zip(generic, sub):
        full[k] = x
      env = param_values(an, full)
      return [_site_apply(an, s, env, d) for s, d in zip(gsites, data)]
    return jax.vjp(f, sub_leaves)[1]([list(c) for c in cot])[0]

  sub = [leaves[k] for k in generic]
  g_recs = [recs[s] for s in gsites]
  g_cots = [cots[s] for s in gsites]
  if generic:
    per_bytes = 4 * max(1, sum(math.prod(jnp.shape(x)) for x in sub))
    chunk = max(1, min(n, chunk_units(per_bytes)))

    def norms_fn(blk):
      data, cot = blk
      grads = unit_map(lambda d, c: generic_unit_grads(sub, d, c), (data, cot),
                       lambda g: jnp.isfinite(sum(_sq_sum(x) for x in g)),
                       isolate=an.grouped_conv)
      return (), sum(_sq_sum(x) for x in grads)

    _, gsq = map_reduce(norms_fn, (g_recs, g_cots), chunk, ())
    sq = sq + gsq

  norms = jnp.sqrt(sq)
  weights = jax.lax.stop_gradient(clip_weights(norms, included, l2_clip_norm))
  valid = weights > 0
  any_valid = jnp.any(valid)
  donor = jnp.arange(n) == jnp.argmax(valid)
  safe = lambda t: jax.tree.map(lambda x: take_valid_or_donor(x, valid, donor), t)

  total = [None] * len(leaves)
  for k, s, chain in ghost_sites:
    site = an.sites[s]
    node = an.graph.nodes[site.node_index]
    if s in explicit:
      grads = explicit[s]
      wsum = jnp.einsum("b,b...->...", weights.astype(jnp.float32),
                        jnp.where(valid.reshape((n,) + (1,) * (grads.ndim - 1)), _f32(grads), 0.0),
                        precision=HIGHEST, out_sharding=sum_sharding(grads))
      if site.kind == "dot":
        lay = _dot_layout(node, site.param_pos[0])
        wsum = wsum.reshape(lay["canon_shape"]).transpose(lay["w_perm"])
    elif site.kind == "dot":
      p = site.param_pos[0]
      # A unit of weight > 0 has finite records (its norm is finite), so
      # zeroing the others' (and their cotangents, in _scaled) keeps NaN
      # out of the contraction in one pass.
      a = recs[s][0]
      a = jnp.where(valid.reshape((n,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))
      a, g, lay = _canon_dot(node, p, a, cots[s][0])
      # Products in float32 (or wider) too: scaling a half-precision
      # cotangent by w_i would round it, and loosen the clip bound by 2^-9.
      wg = _scaled(weights, g)
      wsum = jnp.einsum("bkic,bkif->kcf", _f32(a), wg, precision=HIGHEST,
                        preferred_element_type=jnp.float32,
                        out_sharding=sum_sharding(a))
      wsum = wsum.reshape(lay["canon_shape"]).transpose(lay["w_perm"])
    else:  # gather: scatter-add of scaled cotangents, in float32.
      wp = _f32(penv[node.ins[0]])
      idx = tuple(jnp.where(valid.reshape((n,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
                  for x in recs[s])
      wg = [_scaled(weights, c) for c in cots[s]]

      def f(w, s=s, idx=idx, node=node):
        return jax.vmap(lambda d: _site_apply(an, s, {**penv, node.ins[0]: w}, d))(idx)

      wsum = jax.vjp(f, wp)[1](wg)[0]
    part = _pullback_isometric(chain, _f32(wsum))
    total[k] = part if total[k] is None else total[k] + part

  if generic:
    # The records of units of weight 0 must not put NaN into the batched
    # VJP: a site whose parameter cotangent ignores the data (a bias add)
    # needs nothing; one linear in the data gets zeros (a unit of weight
    # > 0 has finite data there, or its gradient would not be finite);
    # any other gets a valid unit's data (contributing 0 * finite).
    def clean(s, r):
      prim = an.sites[s].primitive
      if prim in _DATA_FREE_VJP:
        return r
      if prim in _LINEAR_IN_DATA:
        return tuple(jnp.where(valid.reshape((n,) + (1,) * (x.ndim - 1)), x,
                               jnp.zeros((), x.dtype)) for x in r)
      return safe(r)

    clean_recs = [clean(s, r) for s, r in zip(gsites, g_recs)]
    wide = all(jnp.finfo(jnp.result_type(x)).bits >= 32 for x in sub) and all(
        jnp.finfo(c.dtype).bits >= 32 for cs in g_cots for c in cs) and not an.rounding
    if wide:
      def f(sub_leaves):
        full = list(leaves)
        for k, x in zip(generic, sub_leaves):
          full[k] = x
        env = param_values(an, full)
        return [jax.vmap(lambda d, s=s: _site_apply(an, s, env, d))(r)
                for s, r in zip(gsites, clean_recs)]
      wg = [[_scaled(weights, c).astype(c.dtype) for c in cs] for cs in g_cots]
      sums = jax.vjp(f, sub)[1](wg)[0]
    else:
      def sum_fn(blk):
        data, cot, w = blk
        grads = jax.vmap(lambda d, c: generic_unit_grads(sub, d, c))(data, cot)
        return [jnp.einsum("b,b...->...", w, jnp.where(
            (w > 0).reshape((-1,) + (1,) * (x.ndim - 1)), _f32(x), 0.0),
            precision=HIGHEST) for x in grads], ()
      acc0 = [jnp.zeros(jnp.shape(x), _f32(jnp.zeros((), jnp.result_type(x))).dtype) for x in sub]
      zeroed = [[jnp.where(valid.reshape((n,) + (1,) * (c.ndim - 1)), c, 0)
                 for c in cs] for cs in g_cots]
      sums, _ = map_reduce(sum_fn, (clean_recs, zeroed, weights), chunk, acc0)
    for k, x in zip(generic, sums):
      total[k] = _f32(x)

  total = [
      jnp.zeros(jnp.shape(x), _f32(jnp.zeros((), jnp.result_type(x))).dtype)
      if t is None else jnp.where(any_valid, t, 0.0)
      for x, t in zip(leaves, total)
  ]
  summed = jax.tree.unflatten(jax.tree.structure(params), total)
  return summed, (norms, values, aux)


def warn_fallback(report: ClipReport) -> None:
  if report.fallback:
    lines = "; ".join(f"{p}: {why}" for p, why in report.fallback.items())
    warnings.warn(
        "method='ghost' forms the per-unit gradient of these parameters"
        f" (exact, but not ghost): {lines}",
        GhostFallbackWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------
# Cost model (used by method="auto").


def extra_cost(an: Analysis, bytes_cost: float, grad_bytes: float,
               subjaxpr_flops: Callable) -> float:
  """Per-unit cost of ghost clipping beyond a plain forward+backward pass.

  In FLOP-equivalents: the norm arithmetic of each site, plus
  ``bytes_cost`` FLOPs per byte of memory traffic for what is written and
  read again (the recorded activations and cotangents; per-layer
  gradients formed explicitly and per-unit gradients of the other
  parameters at ``grad_bytes`` per element, as materialize pays), plus the recomputation of sites whose per-unit gradient is
  formed through JAX's VJP (control flow: ~3x its matmul FLOPs).
  """
  graph = an.graph
  total = 0.0
  size = lambda aval: math.prod(aval.shape)
  ghost_sites = {s: k for k, entries in an.ghost.items() for s, _ in entries}
  for entries in an.ghost.values():
    if len(entries) == 2:  # tied cross term: an L x N Gram over D
      gnode = graph.nodes[an.sites[entries[0][0]].node_index]
      lookups = size(gnode.avals[0]) // max(1, gnode.ins_avals[0].shape[-1])
      lay = _dot_layout(graph.nodes[an.sites[entries[1][0]].node_index],
                        an.sites[entries[1][0]].param_pos[0])
      total += 2 * lookups * lay["n"] * (lay["c"] + 1)
  for s, site in enumerate(an.sites):
    node = graph.nodes[site.node_index]
    traffic = sum(size(node.ins_avals[p]) for p in site.data_pos) + sum(
        size(node.avals[p]) for p in site.out_pos)
    total += bytes_cost * 4 * 2 * traffic
    if s in ghost_sites:
      if site.kind == "dot":
        lay = _dot_layout(node, site.param_pos[0])
        nb, n, c, f = lay["nb"], lay["n"], lay["c"], lay["f"]
        if site.form == "outer":
          total += 2 * nb * (c + f)
        elif site.form == "gram":
          total += 2 * nb * n * n * (c + f + 1)
        else:
          total += 2 * nb * n * c * f + bytes_cost * grad_bytes * nb * c * f
      elif site.kind == "gather":
        out = size(node.avals[0])
        total += 2 * out * max(1, out // max(1, node.ins_avals[0].shape[-1]))
      else:  # conv: the per-unit kernel gradient is formed
        kernel = size(node.ins_avals[1])
        total += 2 * size(node.avals[0]) * kernel / max(1, node.ins_avals[1].shape[-1])
        total += bytes_cost * grad_bytes * kernel
    else:
      total += 3 * subjaxpr_flops(node)
  for k in an.generic_leaves:
    total += bytes_cost * grad_bytes * size(graph.avals[an.leaf_ids[k]])
  return total
