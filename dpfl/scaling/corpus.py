"""An offline text corpus for scaling studies: the Python standard library's source.

Every Python installation carries a few tens of megabytes of real,
human-written text in ``sysconfig.get_paths()["stdlib"]``; no download is
needed. This module turns it into a byte-level language-modelling data set:

* **documents and users**: every ``*.py`` file under the stdlib directory
  (``site-packages``/``dist-packages`` and ``__pycache__`` excluded, so
  installed packages never leak in), sorted by relative path. Each file is one
  *user* (its author group), so user-level DP (issue 4) can treat a file as
  the unit of privacy;
* **tokenizer**: bytes 0..255 are tokens 0..255, ``BOS = 256`` starts every
  sequence (``VOCAB_SIZE = 257``); ``encode``/``decode`` round-trip any bytes;
* **examples**: each file is cut into non-overlapping windows of ``seq_len``
  bytes (a trailing partial window is dropped); a row is ``[BOS, window]``,
  length ``seq_len + 1``, so a model reads ``seq_len`` tokens and predicts
  ``seq_len``. At most ``examples_per_user`` windows per file are kept, spread
  evenly over the file (not just its licence header); files shorter than one
  window have no examples and are not users;
* **split**: by user. A file goes to eval when the SHA-256 of its relative
  path falls in the lowest ``eval_fraction`` of the hash range: stable across
  machines and unaffected by files being added or removed elsewhere.

Everything is deterministic given the installed standard library;
``Corpus.fingerprint`` (a hash of the kept files' paths and bytes, and the
settings) tells two corpora apart, e.g. across Python patch releases.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig

import numpy as np

from accounting import validate as check

BOS = 256
VOCAB_SIZE = 257
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def encode(data: bytes | str) -> np.ndarray:
  """Byte-level tokens (int32, values 0..255) of ``data`` (str is UTF-8 encoded)."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  return np.frombuffer(bytes(data), np.uint8).astype(np.int32)


def decode(tokens) -> str:
  """Text of a token sequence: BOS tokens dropped, bytes decoded as UTF-8 (errors replaced)."""
  tokens = np.asarray(tokens).reshape(-1)
  if tokens.size and (tokens.min() < 0 or tokens.max() > BOS):
    raise ValueError(f"tokens must lie in [0, {BOS}], got values in "
                     f"[{tokens.min()}, {tokens.max()}]")
  return bytes(tokens[tokens != BOS].astype(np.uint8).tolist()).decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A byte-level corpus split by user.

  Attributes:
    seq_len: tokens a model reads (and predicts) per example.
    train_tokens: int32 ``[n_train, seq_len + 1]``, BOS then ``seq_len`` bytes.
    train_user_ids: int32 ``[n_train]``: index into ``train_users`` of each row;
      rows of one user are contiguous.
    train_users: relative paths of the training files (users), sorted.
    eval_tokens, eval_user_ids, eval_users: the same for held-out users.
    fingerprint: hex SHA-256 of the settings and of the kept files' paths and
      bytes; equal fingerprints mean equal corpora.
    source: the directory read.
  """

  seq_len: int
  train_tokens: np.ndarray
  train_user_ids: np.ndarray
  train_users: tuple[str, ...]
  eval_tokens: np.ndarray
  eval_user_ids: np.ndarray
  eval_users: tuple[str, ...]
  fingerprint: str
  source: str

  @property
  def num_train_examples(self) -> int:
    return int(self.train_tokens.shape[0])

  @property
  def num_eval_examples(self) -> int:
    return int(self.eval_tokens.shape[0])

  def examples_by_user(self, split: str = "train") -> list[np.ndarray]:
    """Row indices of each user's examples (one int array per user, none empty)."""
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    ids = self.train_user_ids if split == "train" else self.eval_user_ids
    num_users = len(self.train_users if split == "train" else self.eval_users)
    bounds = np.searchsorted(ids, np.arange(num_users + 1))
    return [np.arange(bounds[u], bounds[u + 1]) for u in range(num_users)]

  def summary(self) -> dict:
    """Sizes and identity, JSON-ready (what a results row records)."""
    return {"name": "python-stdlib", "source": self.source, "fingerprint": self.fingerprint,
            "seq_len": self.seq_len, "train_examples": self.num_train_examples,
            "eval_examples": self.num_eval_examples, "train_users": len(self.train_users),
            "eval_users": len(self.eval_users)}


def stdlib_files(root: str | None = None) -> list[str]:
  """Relative paths of the ``*.py`` files under ``root`` (default: the stdlib), sorted."""
  root = sysconfig.get_paths()["stdlib"] if root is None else root
  if not os.path.isdir(root):
    raise ValueError(f"root must be a directory, got {root!r}")
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
    for f in files:
      if f.endswith(".py"):
        found.append(os.path.relpath(os.path.join(directory, f), root).replace(os.sep, "/"))
  return sorted(found)


def is_eval_user(relative_path: str, eval_fraction: float) -> bool:
  """The split rule: the path's SHA-256, read as a fraction of 2**64, < eval_fraction."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def _windows(data: bytes, seq_len: int, examples_per_user: int) -> np.ndarray:
  """Up to ``examples_per_user`` evenly spread, non-overlapping windows, with BOS."""
  count = len(data) // seq_len
  if count == 0:
    return np.zeros((0, seq_len + 1), np.int32)
  chunks = np.frombuffer(data[:count * seq_len], np.uint8).reshape(count, seq_len)
  if count > examples_per_user:
    chunks = chunks[np.linspace(0, count - 1, examples_per_user).round().astype(int)]
  rows = np.full((chunks.shape[0], seq_len + 1), BOS, np.int32)
  rows[:, 1:] = chunks
  return rows


def load_corpus(*, seq_len: int = 64, examples_per_user: int = 32,
                max_users: int | None = None, eval_fraction: float = 0.1,
                root: str | None = None) -> Corpus:
  """Loads the standard-library corpus (cached per argument tuple).

  Args:
    seq_len: tokens per example, in [1, 4096].
    examples_per_user: cap on windows kept per file, >= 1 (caps both load time
      and a user's weight: a user-level analysis needs such a cap, k).
    max_users: keep only the first ``max_users`` files in sorted order that
      have at least one window (before the split); None keeps all.
    eval_fraction: share of users held out, in [0, 1).
    root: directory to read (default: ``sysconfig.get_paths()["stdlib"]``).

  Returns:
    A ``Corpus``. Raises ValueError on bad arguments or when either split ends
    up empty.
  """
  seq_len = check.integer("seq_len", seq_len, low=1, high=4096)
  examples_per_user = check.positive_int("examples_per_user", examples_per_user)
  if max_users is not None:
    max_users = check.positive_int("max_users", max_users)
  eval_fraction = check.real("eval_fraction", eval_fraction, low=0, high=1, high_open=True)
  root = os.path.abspath(sysconfig.get_paths()["stdlib"] if root is None else root)
  return _load(seq_len, examples_per_user, max_users, eval_fraction, root)


@functools.lru_cache(maxsize=8)
def _load(seq_len, examples_per_user, max_users, eval_fraction, root) -> Corpus:
  digest = hashlib.sha256(
      f"python-stdlib v1 {seq_len} {examples_per_user} {max_users} {eval_fraction}".encode())
  parts = {"train": ([], [], []), "eval": ([], [], [])}  # rows, user ids, names
  kept = 0
  for rel in stdlib_files(root):
    if max_users is not None and kept >= max_users:
      break
    with open(os.path.join(root, rel), "rb") as f:
      data = f.read()
    rows = _windows(data, seq_len, examples_per_user)
    if not len(rows):
      continue
    kept += 1
    digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    rows_list, ids, names = parts["eval" if is_eval_user(rel, eval_fraction) else "train"]
    rows_list.append(rows)
    ids.append(np.full(len(rows), len(names), np.int32))
    names.append(rel)
  arrays = {}
  for split, (rows_list, ids, names) in parts.items():
    if not names:
      raise ValueError(f"the {split} split is empty: no {split} file holds one full window "
                       f"of seq_len={seq_len} bytes (root={root!r}, max_users={max_users}, "
                       f"eval_fraction={eval_fraction}); use shorter sequences, more users "
                       "or another fraction")
    arrays[split] = (np.concatenate(rows_list), np.concatenate(ids), tuple(names))
  for split in arrays:
    for a in arrays[split][:2]:
      a.setflags(write=False)
  return Corpus(seq_len=seq_len, train_tokens=arrays["train"][0],
                train_user_ids=arrays["train"][1], train_users=arrays["train"][2],
                eval_tokens=arrays["eval"][0], eval_user_ids=arrays["eval"][1],
                eval_users=arrays["eval"][2], fingerprint=digest.hexdigest(), source=root)
