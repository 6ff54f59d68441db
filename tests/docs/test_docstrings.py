"""Every public name of dpfl and accounting is documented for the API reference.

The reference (docs/api/*.md) is generated from these docstrings, so a
missing ``Args:`` is a missing table on the site. The rules:

* every name in ``dpfl.__all__``, ``accounting.__all__``, ``dpfl.mf.__all__``,
  ``dpfl.audit.__all__`` and ``dpfl.nnx.__all__`` has a docstring of its own;
* one that takes arguments has an ``Args:`` section (a class: ``Args:`` or,
  for a dataclass / NamedTuple, ``Attributes:``), and one annotated to return
  something has ``Returns:`` (or ``Yields:``);
* each mechanism (an ``accounting.Mechanism`` or a dpfl function that releases
  a privatized value) states its guarantee in a ``Privacy guarantee:`` section.
"""

import inspect

import pytest

import accounting
import dpfl
import dpfl.audit
import dpfl.mf
import dpfl.nnx

PACKAGES = (dpfl, accounting, dpfl.mf, dpfl.audit, dpfl.nnx)
# dpfl's functions that release (or build what releases) a noised value.
DPFL_MECHANISMS = {"clipped_grad", "gaussian_noise", "make_private", "make_private_user_level",
                   "dp_sgd", "clipped_user_updates"}
MF_MECHANISMS = {"blt_noise", "banded_noise", "dense_noise", "matrix_noise", "identity_noise"}


def _names():
  return [pytest.param(package, name, id=f"{package.__name__}.{name}")
          for package in PACKAGES for name in package.__all__]


def _takes_arguments(obj) -> bool:
  try:
    signature = inspect.signature(obj)
  except (TypeError, ValueError):
    return False
  return any(p not in ("self", "cls") for p in signature.parameters)


def _returns_something(obj) -> bool:
  if inspect.isclass(obj):
    return False
  try:
    annotation = inspect.signature(obj).return_annotation
  except (TypeError, ValueError):
    return False
  return annotation not in (inspect.Signature.empty, None, "None")


def _is_mechanism(package, name, obj) -> bool:
  if inspect.isclass(obj) and issubclass(obj, accounting.Mechanism):
    return obj is not accounting.Mechanism
  return (package is dpfl and name in DPFL_MECHANISMS) or (
      package is dpfl.mf and name in MF_MECHANISMS)


@pytest.mark.parametrize("package,name", _names())
def test_public_name_is_documented(package, name):
  obj = getattr(package, name)
  doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
  assert doc and doc.strip(), f"{package.__name__}.{name} has no docstring"
  if _is_mechanism(package, name, obj):
    assert "Privacy guarantee:" in doc, (
        f"{package.__name__}.{name} is a mechanism; its docstring does not state its guarantee "
        "in a 'Privacy guarantee:' section")
  if inspect.isclass(obj) and issubclass(obj, BaseException):
    return  # an exception's argument is its message
  if _takes_arguments(obj):
    assert "Args:" in doc or (inspect.isclass(obj) and "Attributes:" in doc), (
        f"{package.__name__}.{name} takes arguments; its docstring has no Args: section")
  if _returns_something(obj):
    assert "Returns:" in doc or "Yields:" in doc, (
        f"{package.__name__}.{name} returns a value; its docstring has no Returns: section")


def test_the_mechanism_lists_name_public_functions():
  assert DPFL_MECHANISMS <= set(dpfl.__all__)
  assert MF_MECHANISMS <= set(dpfl.mf.__all__)
