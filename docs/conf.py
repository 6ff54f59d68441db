"""Sphinx configuration of dpfl's documentation site.

Build (strict: a warning, or a broken internal reference, fails the build):

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -n -b html docs docs/_build/html

tests/docs/test_docs_build.py runs exactly this build.
"""

import os
import sys

# The site documents the checkout it lives in, also before `pip install -e .`.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "dpfl"
author = "the dpfl authors"
copyright = "the dpfl authors"  # noqa: A001 (Sphinx's name)
release = version = "0.1.0"

extensions = [
    "myst_parser",            # Markdown pages (and README sections via {include})
    "sphinx.ext.autodoc",     # the API reference, from the docstrings
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",    # Google-style Args: / Returns: sections
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# _build: the output. README.md sections are pulled into pages by {include};
# the results file and plots of the scaling study are linked, not pages.
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
# `[text](#a-heading)` links in pages and in the README sections they include.
myst_heading_anchors = 3

# --- API reference --------------------------------------------------------
autodoc_default_options = {}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" as fields of the class, not as second descriptions of the
# attributes autodoc documents itself.
napoleon_use_ivar = True
# Every mechanism's docstring states what it guarantees under this heading
# (tests/docs/test_docstrings.py checks it is there).
napoleon_custom_sections = ["Privacy guarantee"]

# Type names in signatures and docstrings that are not in this site (numpy,
# JAX, optax, flax, dp-accounting, the standard library): the strict build
# (-n) would otherwise fail on each; without network access there is no
# intersphinx inventory to resolve them against.
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|numpy|np|optax|flax|dp_accounting|chex|pyarrow|orbax)(\..*)?"),
    ("py:.*", r"(typing|collections|os|pathlib|concurrent|dataclasses|enum|abc)\..*"),
    ("py:class", r"(Array|ArrayLike|ArrayTree|PyTree|Params|Pytree|Mesh|Sharding|NamedSharding|"
                 r"GradientTransformation|GradientTransformationExtraArgs|DpEvent|"
                 r"Callable|Iterator|Iterable|Sequence|Mapping|Any|Optional|Union|Literal|"
                 r"NamedTuple|Protocol|TypeVar|ndarray|PRNGKey|Key|KeyArray|dtype)"),
    ("py:class", r".*\.(Array|ArrayTree|PyTree|Params)"),
    ("py:obj", r".*"),
    ("py:data", r"typing\..*"),
    ("py:exc", r".*"),
]
# dpfl's own names that appear in signatures but are not public API (internal
# base classes and state types); listed one by one, so a new broken reference
# still fails the build.
nitpick_ignore = [
    ("py:class", "dpfl.noise.NoiseState"),
    ("py:class", "dpfl.audit.bound.GuessOutcome"),
    ("py:class", "dpfl.noise.NoiseStrategy"),
    ("py:class", "dpfl.ghost.trace.ClipReport"),
    ("py:class", "dpfl.sampling.base.PoissonRateSampler"),
    ("py:class", "dpfl.sampling.base.FixedSizeSampler"),
    ("py:class", "dpfl.sampling.users._PaddedPoissonSampler"),
    ("py:class", "dpfl.mf.strategies._ToeplitzLosses"),
]

# --- HTML -------------------------------------------------------------------
html_theme = "furo"
html_title = "dpfl"
html_static_path = []


# --- one directive: every name of a package's __all__ ------------------------
# `.. dpfl-all:: dpfl` documents each name of `dpfl.__all__` under the
# package's own name (`dpfl.make_private`, not `dpfl.privatize.make_private`),
# so the reference can never miss a public name, nor list a private one.

import importlib  # noqa: E402
import inspect  # noqa: E402

from docutils import nodes  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402


def public_names(package: str) -> list[str]:
  """The names a package exports, in its own order (sorted)."""
  return sorted(importlib.import_module(package).__all__)


# A name dpfl re-exports from accounting is documented in accounting's page.
REEXPORTED_FROM = ("accounting",)


class AllNames(SphinxDirective):
  """Documents every name in a package's ``__all__`` with autodoc."""

  required_arguments = 1

  def run(self):
    package = self.arguments[0]
    module = importlib.import_module(package)
    lines = [f".. currentmodule:: {package}", ""]
    for name in public_names(package):
      obj = getattr(module, name)
      home = getattr(obj, "__module__", "") or ""
      owner = next((other for other in REEXPORTED_FROM if other != package
                    and home.split(".")[0] == other and name in public_names(other)), None)
      if owner:  # documented once, where it lives; here a pointer
        directive = "exception" if inspect.isclass(obj) and issubclass(obj, BaseException) else (
            "class" if inspect.isclass(obj) else "function")
        role = {"exception": "exc", "class": "class", "function": "func"}[directive]
        lines += [f".. py:{directive}:: {name}", "",
                  f"   The same object as :py:{role}:`{owner}.{name}` (re-exported here).", ""]
        continue
      if inspect.isclass(obj):
        if issubclass(obj, BaseException):
          lines += [f".. autoexception:: {name}", ""]
        else:
          lines += [f".. autoclass:: {name}", "   :members:", ""]
      elif callable(obj):
        lines += [f".. autofunction:: {name}", ""]
      else:
        lines += [f".. autodata:: {name}", "   :no-value:", ""]
    node = nodes.section()
    node.document = self.state.document
    self.state.nested_parse(StringList(lines, source=f"<{package}.__all__>"), 0, node)
    return node.children


def _public_alias(app, env, node, contnode):
  """Resolves `dpfl.private_training.PrivateState` to the documented `dpfl.PrivateState`."""
  target = node.get("reftarget", "")
  if node.get("refdomain") != "py" or "." not in target:
    return None
  domain = env.get_domain("py")
  parts = target.split(".")
  candidates = []
  for package in ("dpfl", "accounting", "dpfl.mf"):
    for cut in range(1, len(parts)):
      candidates.append(package + "." + ".".join(parts[cut:]))
  for candidate in candidates:
    if candidate in domain.objects:
      return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], candidate,
                                 node, contnode) or domain.resolve_any_xref(
                                     env, node["refdoc"], app.builder, candidate, node,
                                     contnode) and None
  return None


def setup(app):
  app.add_directive("dpfl-all", AllNames)
  app.connect("missing-reference", _public_alias)
