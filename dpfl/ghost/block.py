"""Evaluating a traced unit loss with probes: records and cotangents at
every site, per-unit norms, and the clipped sum. See :mod:`dpfl.ghost`."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from dpfl import explicit_sharding
from dpfl.ghost.norms import (
    HIGHEST, canon_dot, dot_layout, dot_sq_norms, f32, gather_sq_norms,
    pullback_isometric, sq_sum, tied_cross)
from dpfl.ghost.trace import (
    DATA_FREE_VJP, LINEAR_IN_DATA, Analysis, ClipReport, GhostFallbackWarning, bind_node)

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
    outs = bind_node(node, [_read(env, i) for i in node.ins])
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
    outs = bind_node(node, vals)
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
  outs = bind_node(node, vals)
  return [outs[p] for p in site.out_pos]


def _probe_sharding(units_zero, aval):
  """[units, *aval.shape]: the unit axis as ``units_zero``'s, the rest as aval's."""
  unit = explicit_sharding.of(units_zero)
  if unit is None:
    return None
  spec = tuple(getattr(getattr(aval, "sharding", None), "spec", ()) or ())
  spec = spec + (None,) * (len(aval.shape) - len(spec))
  head = tuple(unit.spec)[:1] or (None,)
  return jax.sharding.NamedSharding(unit.mesh, jax.sharding.PartitionSpec(*head, *spec))


def _kcf_sharding(a, g):
  """Sharding of einsum("bkic,bkif->kcf", a, g): k, c as a's, f as g's.

  The unit axis b is contracted (summed over devices): naming the output
  sharding keeps the parameter's own sharding (c from the layer input, f
  from the output cotangent) instead of a replicated, parameter-sized sum.
  """
  sa, sg = explicit_sharding.of_dims(a, (1, 2, 3)), explicit_sharding.of_dims(g, (1, 2, 3))
  if sa is None:
    return None
  ka, _, ca = sa.spec
  kg, _, fg = sg.spec
  used = {ax for s in (ka, ca) for ax in ((s,) if isinstance(s, str) else (s or ()))}
  f = fg if not ({fg} & used) else None
  return jax.sharding.NamedSharding(
      sa.mesh, jax.sharding.PartitionSpec(ka if ka is not None else kg, ca, f))


def _scaled(w, x):
  """w (per unit) * x, where w == 0 gives exact 0 (x may be NaN)."""
  wx = f32(x) * w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(f32(x).dtype)
  return jnp.where(w.reshape(w.shape + (1,) * (x.ndim - 1)) > 0, wx, 0.0)


def block(an: Analysis, params, units, included, l2_clip_norm, chunk_units,
          clip_weights, take_valid_or_donor, map_reduce,
          unit_map):
  """The clipped sum and per-unit statistics of one block of units."""
  leaves = jax.tree.leaves(params)
  penv = param_values(an, leaves)
  batch, mask = units
  flat_inputs = jax.tree.leaves((batch, mask))
  n = included.shape[0]
  def zeros(aval):
    # Broadcast from the unit axis so that the probes are sharded as the
    # batch is (vmap wants every mapped input sharded alike), and, under an
    # Explicit mesh, as the site output is on its other axes (a layer
    # whose weight is sharded over "model" has a model-sharded output):
    # its cotangent then stays sharded, never gathered.
    z = jnp.zeros_like(included, dtype=aval.dtype)
    return jax.lax.broadcast_in_dim(z, (n,) + tuple(aval.shape), (0,),
                                    out_sharding=_probe_sharding(z, aval))

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
      ok = ok & jnp.all(jnp.isfinite(c), axis=tuple(range(1, c.ndim)))
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
      a, g, _ = canon_dot(node, p, recs[s][0], cots[s][0])
      if site.form == "explicit":
        grads = jnp.einsum("bkic,bkif->bkcf", a, g, precision=HIGHEST,
                           preferred_element_type=jnp.float32)
        explicit[s] = grads
        sq = sq + jnp.sum(jnp.square(grads), axis=(1, 2, 3))
      else:
        sq = sq + dot_sq_norms(site.form, a, g)
    elif site.kind == "gather":
      sq = sq + gather_sq_norms(node, recs[s][0], cots[s][0])
    else:  # conv: the per-unit kernel gradient (small) is formed.
      def unit_grad(data, cot, s=s, node=node):
        wp = penv[node.ins[1]]
        f = lambda w: _site_apply(an, s, {**penv, node.ins[1]: w}, data)
        return jax.vjp(f, wp)[1](list(cot))[0]
      grads = unit_map(unit_grad, (recs[s], cots[s]),
                       lambda x: jnp.isfinite(sq_sum(x)), isolate=an.grouped_conv)
      explicit[s] = grads
      sq = sq + sq_sum(grads)
  for k, entries in an.ghost.items():
    if len(entries) == 2:  # tied embedding: the two sites' cross term
      (sg, _), (sd, _) = entries
      gnode = an.graph.nodes[an.sites[sg].node_index]
      dnode = an.graph.nodes[an.sites[sd].node_index]
      sq = sq + tied_cross(gnode, recs[sg][0], cots[sg][0], dnode,
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
    outs, pull = jax.vjp(f, sub_leaves)
    # Under an Explicit mesh a site output may be sharded over a parameter
    # axis (a bias add on a model-sharded activation) while its recorded
    # cotangent is not: give the cotangent the output's type.
    return pull([[explicit_sharding.like(c, o) for c, o in zip(cs, os)]
                 for cs, os in zip(cot, outs)])[0]

  sub = [leaves[k] for k in generic]
  g_recs = [recs[s] for s in gsites]
  g_cots = [cots[s] for s in gsites]
  if generic:
    per_bytes = 4 * max(1, sum(math.prod(jnp.shape(x)) for x in sub))
    chunk = max(1, min(n, chunk_units(per_bytes)))

    def norms_fn(blk):
      data, cot = blk
      grads = unit_map(lambda d, c: generic_unit_grads(sub, d, c), (data, cot),
                       lambda g: jnp.isfinite(sum(sq_sum(x) for x in g)),
                       isolate=an.grouped_conv)
      return (), sum(sq_sum(x) for x in grads)

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
                        jnp.where(valid.reshape((n,) + (1,) * (grads.ndim - 1)), f32(grads), 0.0),
                        precision=HIGHEST,
                        out_sharding=explicit_sharding.of_dims(grads, range(1, grads.ndim)))
      if site.kind == "dot":
        lay = dot_layout(node, site.param_pos[0])
        wsum = explicit_sharding.reshape(wsum, lay["canon_shape"]).transpose(lay["w_perm"])
    elif site.kind == "dot":
      p = site.param_pos[0]
      # A unit of weight > 0 has finite records (its norm is finite), so
      # zeroing the others' (and their cotangents, in _scaled) keeps NaN
      # out of the contraction in one pass.
      a = recs[s][0]
      a = jnp.where(valid.reshape((n,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))
      a, g, lay = canon_dot(node, p, a, cots[s][0])
      # Products in float32 (or wider) too: scaling a half-precision
      # cotangent by w_i would round it, and loosen the clip bound by 2^-9.
      wg = _scaled(weights, g)
      wsum = jnp.einsum("bkic,bkif->kcf", f32(a), wg, precision=HIGHEST,
                        preferred_element_type=jnp.float32,
                        out_sharding=_kcf_sharding(a, g))
      wsum = explicit_sharding.reshape(wsum, lay["canon_shape"]).transpose(lay["w_perm"])
    else:  # gather: scatter-add of scaled cotangents, in float32.
      wp = f32(penv[node.ins[0]])
      idx = tuple(jnp.where(valid.reshape((n,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
                  for x in recs[s])
      wg = [_scaled(weights, c) for c in cots[s]]

      def f(w, s=s, idx=idx, node=node):
        return jax.vmap(lambda d: _site_apply(an, s, {**penv, node.ins[0]: w}, d))(idx)

      wsum = jax.vjp(f, wp)[1](wg)[0]
    part = pullback_isometric(chain, f32(wsum))
    total[k] = part if total[k] is None else total[k] + part

  if generic:
    # The records of units of weight 0 must not put NaN into the batched
    # VJP: a site whose parameter cotangent ignores the data (a bias add)
    # needs nothing; one linear in the data gets zeros (a unit of weight
    # > 0 has finite data there, or its gradient would not be finite);
    # any other gets a valid unit's data (contributing 0 * finite).
    def clean(s, r):
      prim = an.sites[s].primitive
      if prim in DATA_FREE_VJP:
        return r
      if prim in LINEAR_IN_DATA:
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
      outs, pull = jax.vjp(f, sub)
      sums = pull([[explicit_sharding.like(c, o) for c, o in zip(cs, os)]
                   for cs, os in zip(wg, outs)])[0]
    else:
      def sum_fn(blk):
        data, cot, w = blk
        grads = jax.vmap(lambda d, c: generic_unit_grads(sub, d, c))(data, cot)
        return [jnp.einsum("b,b...->...", w, jnp.where(
            (w > 0).reshape((-1,) + (1,) * (x.ndim - 1)), f32(x), 0.0),
            precision=HIGHEST,
            out_sharding=explicit_sharding.of_dims(x, range(1, x.ndim))) for x in grads], ()
      acc0 = [jnp.zeros_like(x, f32(jnp.zeros((), jnp.result_type(x))).dtype) for x in sub]
      zeroed = [[jnp.where(valid.reshape((n,) + (1,) * (c.ndim - 1)), c, 0)
                 for c in cs] for cs in g_cots]
      sums, _ = map_reduce(sum_fn, (clean_recs, zeroed, weights), chunk, acc0)
    for k, x in zip(generic, sums):
      total[k] = f32(x)

  total = [
      jnp.zeros_like(x, f32(jnp.zeros((), jnp.result_type(x))).dtype)
      if t is None else explicit_sharding.like(jnp.where(any_valid, t, 0.0), x)
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
