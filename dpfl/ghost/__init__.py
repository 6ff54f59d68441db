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

from dpfl.ghost.block import block, param_values, warn_fallback
from dpfl.ghost.norms import extra_cost
from dpfl.ghost.trace import (
    Analysis, ClipReport, GhostFallbackWarning, GhostUnsupported, Site, analyze,
    has_grouped_conv, sub_jaxprs)

__all__ = [
    "Analysis", "ClipReport", "GhostFallbackWarning", "GhostUnsupported", "Site",
    "analyze", "block", "extra_cost", "has_grouped_conv", "param_values",
    "sub_jaxprs", "warn_fallback",
]
