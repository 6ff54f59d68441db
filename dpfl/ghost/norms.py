"""Per-unit squared norms at a site from its records (dot_general in
canonical form, token-equality Grams, the tied-embedding cross term), the
isometric pullback, and the cost model. See :mod:`dpfl.ghost`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpfl import explicit_sharding

if TYPE_CHECKING:
  from dpfl.ghost.trace import Analysis

HIGHEST = jax.lax.Precision.HIGHEST


def gather_mode(node) -> str | None:
  """The gather's out-of-bounds mode, as its gradient treats it."""
  mode = str(node.params.get("mode", "")).upper()
  for name in ("FILL_OR_DROP", "PROMISE_IN_BOUNDS", "CLIP"):
    if name in mode:
      return name.lower()
  return None


# ---------------------------------------------------------------------------
# dot_general in canonical form: A [nb, N, C], g [nb, N, F].


def dot_layout(node, p):
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


def choose_form(graph, site) -> str:
  node = graph.nodes[site.node_index]
  if site.kind == "dot":
    lay = dot_layout(node, site.param_pos[0])
    if lay["n"] == 1:
      return "outer"
    return "gram" if lay["n"] * (lay["c"] + lay["f"]) <= lay["c"] * lay["f"] else "explicit"
  if site.kind == "gather":
    return "gram"
  return "explicit"


def canon_dot(node, p, a, g):
  """a [U, *a_shape], g [U, *out] -> [U, nb, N, C], [U, nb, N, F]."""
  lay = dot_layout(node, p)
  u = a.shape[0]
  # explicit_sharding.reshape: under an Explicit mesh the unit axis stays
  # sharded as the batch is, and a feature axis as the parameter is.
  a = explicit_sharding.reshape(jnp.transpose(a, [0] + [d + 1 for d in lay["a_perm"]]),
                                (u, lay["nb"], lay["n"], lay["c"]))
  g = explicit_sharding.reshape(jnp.transpose(g, [0] + [d + 1 for d in lay["g_perm"]]),
                                (u, lay["nb"], lay["n"], lay["f"]))
  return a, g, lay


def f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def sq_sum(x):
  x = f32(x)
  # Over the non-unit axes, not a reshape to [units, -1], which would
  # gather an axis sharded over an Explicit mesh.
  return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def dot_sq_norms(form, a, g):
  if form == "outer":  # one token: ||a g^T||^2 = ||a||^2 ||g||^2
    sa = jnp.sum(jnp.square(f32(a)), axis=(2, 3))
    sg = jnp.sum(jnp.square(f32(g)), axis=(2, 3))
    return jnp.sum(sa * sg, axis=1)
  if form == "gram":
    # A feature axis sharded over a mesh (a model-sharded layer) is summed
    # over devices: the [units, k, i, j] Gram keeps the unit and k axes'
    # sharding, its token axes are whole.
    ga = jnp.einsum("bkic,bkjc->bkij", a, a, precision=HIGHEST,
                    preferred_element_type=jnp.float32,
                    out_sharding=explicit_sharding.of_dims(a, (0, 1, None, None)))
    gg = jnp.einsum("bkif,bkjf->bkij", g, g, precision=HIGHEST,
                    preferred_element_type=jnp.float32,
                    out_sharding=explicit_sharding.of_dims(g, (0, 1, None, None)))
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
  g = explicit_sharding.reshape(g, (u, nlook, g.size // max(1, u * nlook)))
  idx = explicit_sharding.reshape(  # index_vector_dim is last
      idx, (u, nlook, idx.size // max(1, u * nlook)))
  shape = node.ins_avals[0].shape
  dims = list(dn.start_index_map)
  limit = jnp.asarray([shape[d] - 1 for d in dims], idx.dtype)
  if gather_mode(node) == "clip":
    idx = jnp.clip(idx, 0, limit)
    valid = jnp.ones(idx.shape[:2], bool)
  else:
    # fill_or_drop, and promise_in_bounds (``E[ids]``): the forward pass
    # may read a clamped row, but the gradient (a scatter-add) drops an
    # out-of-range lookup, so its cotangent is in no unit's gradient.
    valid = jnp.all((idx >= 0) & (idx <= limit), axis=-1)
  return idx, valid, g


def gather_sq_norms(node, idx, g):
  """Token-equality Gram: sum_{t,s} [id_t == id_s] (g_t . g_s)."""
  idx, valid, g = _gather_canon(node, idx, g)
  same = jnp.all(idx[:, :, None, :] == idx[:, None, :, :], axis=-1)
  same = same & valid[:, :, None] & valid[:, None, :]
  gg = jnp.einsum("bif,bjf->bij", g, g, precision=HIGHEST,
                  preferred_element_type=jnp.float32)
  return jnp.sum(jnp.where(same, gg, 0.0), axis=(1, 2))


def tied_cross(gnode, idx, g1, dnode, p, h, glog):
  """2 <G_gather, G_dot> = 2 sum_{t,s} glog[s, id_t] (g1_t . h_s) per unit."""
  idx, valid, g1 = _gather_canon(gnode, idx, g1)
  a, g, _ = canon_dot(dnode, p, h, glog)  # [U, 1, N, D], [U, 1, N, V]
  a, g = a[:, 0], g[:, 0]
  ids = jnp.broadcast_to(idx[:, None, :, 0], (g.shape[0], g.shape[1], idx.shape[1]))
  m = jnp.take_along_axis(g, ids, axis=2)  # [U, N (s), L (t)]
  prod = jnp.einsum("btd,bsd->bst", g1, a, precision=HIGHEST,
                    preferred_element_type=jnp.float32)
  cross = jnp.where(valid[:, None, :], f32(m) * prod, 0.0)
  return 2.0 * jnp.sum(cross, axis=(1, 2))


def pullback_isometric(chain, ct):
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
      ct = explicit_sharding.reshape(ct, in_shape)
  return ct


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
      lay = dot_layout(graph.nodes[an.sites[entries[1][0]].node_index],
                        an.sites[entries[1][0]].param_pos[0])
      total += 2 * lookups * lay["n"] * (lay["c"] + 1)
  for s, site in enumerate(an.sites):
    node = graph.nodes[site.node_index]
    traffic = sum(size(node.ins_avals[p]) for p in site.data_pos) + sum(
        size(node.avals[p]) for p in site.out_pos)
    total += bytes_cost * 4 * 2 * traffic
    if s in ghost_sites:
      if site.kind == "dot":
        lay = dot_layout(node, site.param_pos[0])
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
