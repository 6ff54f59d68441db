"""The collectives of a compiled XLA program, read from its HLO text (not collected).

Used by the parameter-sharding tests to check what a sharded step moves
between devices: each collective's kind, result size (elements, summed
over a tuple) and the mesh axes it communicates over. The axis is found
from the replica groups: the group holding device 0 is compared with the
groups of a mesh's named axes (device ``i`` of ``mesh.devices.flat``).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

KINDS = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
_OP = re.compile(
    r"=\s*(?P<type>.*?)\s(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\((?P<rest>.*)$")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


class Collective(NamedTuple):
  kind: str
  elements: int        # of the result, summed over a tuple's elements
  shapes: tuple        # the result shapes
  group: frozenset     # the devices device 0 communicates with (ids)
  op_name: str         # jax's op_name metadata, for messages


def _iota_groups(text: str) -> np.ndarray | None:
  """``[G,S]<=[d0,d1,...]T(perm)`` (perm optional) as a [G, S] array of ids."""
  m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if not m:
    return None
  dims = [int(x) for x in m.group(3).split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(4):
    ids = ids.transpose([int(x) for x in m.group(4).split(",")])
  return ids.reshape(int(m.group(1)), int(m.group(2)))


def _group_of_zero(line: str, num_devices: int) -> frozenset:
  m = re.search(r"replica_groups=(\S+)", line)
  if m is None:  # no groups: all devices
    return frozenset(range(num_devices))
  text = m.group(1)
  if text.startswith("mesh["):
    # mesh['a'=2,'b'=1,...] {'b',...}, device_ids=(iota): the devices that
    # differ only along the named axes form a group.
    sizes = [(k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", text)]
    rest = line[m.end():]
    named = re.match(r"\s*\{([^}]*)\}", rest)
    axes = set(re.findall(r"'(\w+)'", named.group(1))) if named else set(k for k, _ in sizes)
    ids = np.arange(math.prod(s for _, s in sizes)).reshape([s for _, s in sizes])
    dev = re.search(r"device_ids=\((\[[^)]*\]\S*?)\)", line)
    if dev:
      spec = dev.group(1)
      dm = re.match(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
      dims = [int(x) for x in dm.group(1).split(",")]
      flat = np.arange(math.prod(dims)).reshape(dims)
      if dm.group(2):
        flat = flat.transpose([int(x) for x in dm.group(2).split(",")])
      ids = flat.reshape(ids.shape)
    index = tuple(slice(None) if k in axes else 0 for k, _ in sizes)
    # The group holding the device at mesh position 0 (not necessarily id 0).
    group = set(np.ravel(ids[index]).tolist())
    if 0 not in group:  # find the group holding device 0
      pos = np.argwhere(ids == 0)[0]
      index = tuple(slice(None) if k in axes else int(p) for (k, _), p in zip(sizes, pos))
      group = set(np.ravel(ids[index]).tolist())
    return frozenset(group)
  iota = _iota_groups(text)
  if iota is not None:
    return frozenset(iota[np.argwhere(iota == 0)[0][0]].tolist())
  groups = re.findall(r"\{([\d,]*)\}", text)
  for g in groups:
    ids = {int(x) for x in g.split(",") if x}
    if 0 in ids:
      return frozenset(ids)
  return frozenset(range(num_devices))


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m or "-done(" in line:
      continue
    shapes = tuple(tuple(int(d) for d in s.split(",") if d)
                   for s in _SHAPE.findall(m.group("type")))
    name = re.search(r'op_name="([^"]*)"', line)
    out.append(Collective(m.group("kind"), sum(math.prod(s) for s in shapes), shapes,
                          _group_of_zero(line, num_devices),
                          name.group(1) if name else ""))
  return out


def axis_groups(mesh) -> dict[frozenset, str]:
  """{group of device ids holding device 0: axis name(s)} for a mesh."""
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  out = {}
  names = mesh.axis_names
  pos = tuple(int(p) for p in np.argwhere(ids == 0)[0])
  for k in range(1, 2 ** len(names)):
    axes = [n for i, n in enumerate(names) if k >> i & 1]
    index = tuple(slice(None) if n in axes else p for n, p in zip(names, pos))
    out.setdefault(frozenset(np.ravel(ids[index]).tolist()), "+".join(axes))
  out.setdefault(frozenset([0]), "none")
  return out
