"""The results file of a scaling sweep: one JSON object per line, one line per run.

``dpfl sweep`` appends a line when a run finishes; ``dpfl fit`` and the
planner read them. A line is written whole (one ``write`` of the JSON text
and its newline, then ``fsync``), so a crash leaves at most one truncated
last line: ``read_results`` skips it with a warning, the run it belonged to
is trained again on resume, and the next ``append_result`` cuts it off.

Schema (``SCHEMA_VERSION = 1``). Losses are mean next-token cross-entropy in
nats per token on the byte-level corpus (``dpfl.scaling.corpus``).

  ============================  ==============================================
  key                           meaning
  ============================  ==============================================
  ``schema_version``            int, 1
  ``run_id``                    str, 16 hex digits: SHA-256 of the run's
                                configuration (``RunConfig.key()``) and the
                                corpus fingerprint; the resume key
  ``model``                     str, family name (``dpfl.scaling.models``)
  ``params``                    int, N: exact trainable parameter count
  ``private``                   bool, False for the non-private baseline
  ``batch_size``                int, B: expected batch size (Poisson sampling,
                                private) or the fixed batch size (non-private)
  ``noise_multiplier``          float, σ (noise std / clip norm); 0.0 when
                                not private
  ``noise_batch_ratio``         float, σ / B; 0.0 when not private
  ``steps``                     int, T: optimizer steps
  ``learning_rate``             float, peak Adam learning rate
  ``warmup_steps``              int, linear warm-up length; the rate is
                                constant afterwards and does not depend on T,
                                so a curve's point at step t estimates a run
                                of t steps (drop t <= warmup_steps to fit)
  ``l2_clip_norm``              float, C (null when not private)
  ``seq_len``                   int, tokens per example (read and predicted)
  ``dataset_size``              int, training examples (the privacy units)
  ``sampling_prob``             float, q = B / dataset_size
  ``max_batch_size``            int or null: static (truncated) Poisson batch
                                shape; null when not private
  ``delta``                     float, δ at which ``epsilon`` is reported
  ``epsilon``                   float or null: ε at δ of the steps run,
                                recomputed by ``accounting`` from the run's
                                ledger (example-level, add/remove one
                                example); null when not private (ε = ∞)
  ``accountant``                str, ``"pld"`` (null when not private)
  ``mechanism``                 dict or null: the ledger's mechanism
                                (``accounting.from_dict`` rebuilds it)
  ``flops``                     float, 6 · N · T · B · seq_len
  ``tokens``                    int, T · B · seq_len (expected, for Poisson)
  ``train_loss``                list of [step, loss]: mean training loss of
                                the batches since the previous point (the
                                real examples of each batch; not privatized)
  ``eval_loss``                 list of [step, loss]: loss on the fixed eval
                                subset after ``step`` steps; starts at step 0
                                and ends at step T
  ``final_eval_loss``           float, eval loss after T steps (null if the
                                run diverged: JSON has no NaN)
  ``eval_examples``             int, eval sequences the eval loss averages
  ``seed``                      int, seed of init, sampling and noise: the
                                one given, or the one drawn from OS entropy
                                (up to 64 bits: read it as an exact integer)
  ``corpus``                    dict, ``Corpus.summary()`` (fingerprint, sizes)
  ``seconds``                   float, wall time of the run (compile and
                                evaluation included)
  ``tokens_per_second``         float, training throughput over steps 2..T
                                (compile and evaluation excluded)
  ``dpfl_version``              str
  ``privacy_unit``              optional str: ``"user"`` for a user-level
                                (ULS) run, whose ``batch_size``,
                                ``dataset_size``, ``sampling_prob`` and
                                ``epsilon`` count users (files) and whose
                                ``flops`` / ``tokens`` use the expected
                                examples per step; absent for example level
  ``devices``                   optional int: the local devices the run was
                                trained on, data parallel (``dpfl sweep
                                --devices``); absent for one device. The
                                same run (run id, seed) to float rounding; a
                                private row's ``max_batch_size`` (and so
                                its truncated-Poisson ε) is that of the
                                shape padded to a multiple of ``devices``
  ============================  ==============================================

Readers should ignore keys they do not know; a new key does not bump the
version, a changed meaning does.

**Point tables (CSV).** A law can also be fitted from anyone's sweep, given as
a plain CSV table with one row per evaluated point, as McKenna et al. 2025
release theirs (``read_points_csv``; ``dpfl fit --results FILE.csv``):

  ======================  ====================================================
  column                  meaning
  ======================  ====================================================
  ``model``               model name (any text; one name, one size)
  ``params``              N, parameters: an integer >= 1 (``4500000`` or
                          ``4.5e6``); a model name always has the same N
  ``learning_rate``       peak learning rate, > 0
  ``steps``               T, the optimizer steps of the point: integer >= 1
  ``noise_batch_ratio``   σ/B (noise multiplier over expected batch size),
                          >= 0; 0 is the non-private baseline
  ``loss``                the evaluated loss after T steps, finite and > 0
  ======================  ====================================================

The header row is required and names exactly these six columns, in any
order; no other column is allowed (a misspelt or extra column is an error,
not ignored). Values are plain numbers (``1e-3``, ``0.0001``); surrounding
spaces are ignored, blank lines are skipped, the file is UTF-8 (a BOM is
allowed). Several rows may share (model, learning_rate, noise_batch_ratio):
together they are that configuration's loss curve over steps. The table does
not say its sequence length, the largest epochs (q·T) or sampling rate q of
its runs: give them to ``dpfl fit`` (``--seq-len``, ``--max-epochs``,
``--max-sampling-prob``) so the law records its support.

A sweep sharded over jobs (``dpfl sweep --shard I/N``) writes one JSON-lines
file per shard; ``read_inputs`` (what ``dpfl fit`` calls with every
``--results`` file) merges them: a run id found in two files is kept once
when its rows are identical and is an error otherwise.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import warnings
from typing import Any, TypedDict

SCHEMA_VERSION = 1


class ResultRow(TypedDict):
  """One finished run (see the module docstring for each key's meaning)."""

  schema_version: int
  run_id: str
  model: str
  params: int
  private: bool
  batch_size: int
  noise_multiplier: float
  noise_batch_ratio: float
  steps: int
  learning_rate: float
  warmup_steps: int
  l2_clip_norm: float | None
  seq_len: int
  dataset_size: int
  sampling_prob: float
  max_batch_size: int | None
  delta: float
  epsilon: float | None
  accountant: str | None
  mechanism: dict | None
  flops: float
  tokens: int
  train_loss: list[list[float]]
  eval_loss: list[list[float]]
  final_eval_loss: float | None
  eval_examples: int
  seed: int
  corpus: dict
  seconds: float
  tokens_per_second: float
  dpfl_version: str


_INT = (numbers.Integral,)
_REAL = (numbers.Real,)
_TYPES: dict[str, tuple] = {
    "schema_version": _INT, "run_id": (str,), "model": (str,), "params": _INT,
    "private": (bool,), "batch_size": _INT, "noise_multiplier": _REAL,
    "noise_batch_ratio": _REAL, "steps": _INT, "learning_rate": _REAL,
    "warmup_steps": _INT, "l2_clip_norm": _REAL + (type(None),), "seq_len": _INT,
    "dataset_size": _INT, "sampling_prob": _REAL, "max_batch_size": _INT + (type(None),),
    "delta": _REAL, "epsilon": _REAL + (type(None),), "accountant": (str, type(None)),
    "mechanism": (dict, type(None)), "flops": _REAL, "tokens": _INT, "train_loss": (list,),
    "eval_loss": (list,), "final_eval_loss": _REAL + (type(None),), "eval_examples": _INT,
    "seed": _INT,
    "corpus": (dict,), "seconds": _REAL, "tokens_per_second": _REAL, "dpfl_version": (str,),
}
REQUIRED_KEYS = tuple(ResultRow.__annotations__)


def validate_row(row: dict[str, Any]) -> None:
  """Raises ValueError naming the first missing or mistyped key of ``row``."""
  if not isinstance(row, dict):
    raise ValueError(f"a result row must be a dict, got {type(row).__name__}")
  for key in REQUIRED_KEYS:
    if key not in row:
      raise ValueError(f"result row is missing key {key!r}")
    value = row[key]
    if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and key != "private"):
      raise ValueError(f"result row key {key!r} has type {type(value).__name__}: {value!r}")
  if row["schema_version"] != SCHEMA_VERSION:
    raise ValueError(f"result row has schema_version {row['schema_version']!r}, "
                     f"this dpfl reads {SCHEMA_VERSION}")
  for key in ("train_loss", "eval_loss"):
    for point in row[key]:
      if not (isinstance(point, list) and len(point) == 2):
        raise ValueError(f"result row key {key!r} must hold [step, loss] pairs, got {point!r}")
  if row["private"] != (row["epsilon"] is not None):
    raise ValueError("result row: 'epsilon' must be null exactly when 'private' is false")


def _finite_or_none(value: Any) -> Any:
  """JSON has no inf/nan: non-finite floats (a diverged loss) are written as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  return value


def append_result(path: str | os.PathLike, row: dict[str, Any]) -> None:
  """Validates ``row`` and appends it as one line to the results file (created if absent).

  A non-finite loss is stored as null (JSON has no NaN); ``final_eval_loss``
  is then null too and readers must treat the run as diverged.
  """
  validate_row(row)
  text = json.dumps(_finite_or_none(row), sort_keys=True, allow_nan=False) + "\n"
  path = os.fspath(path)
  with open(path, "a+b") as f:
    if f.tell() > 0:
      f.seek(0)
      data = f.read()
      if not data.endswith(b"\n"):
        # A crash cut the last row short (rows are written whole, newline
        # last): drop the fragment, so the file stays one JSON row per line.
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: dropping a truncated last line ({len(data) - keep} bytes)")
        f.truncate(keep)
      f.seek(0, os.SEEK_END)
    f.write(text.encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All rows of a results file, in file order ([] if the file does not exist).

  A line that is not valid JSON raises ValueError with its line number,
  except a truncated *last* line (a run interrupted while writing), which is
  skipped with a warning. Rows are returned as parsed; use ``validate_row``
  to check one against this version's schema.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as err:
      if number - 1 == last:
        warnings.warn(f"{path}:{number}: skipping a truncated last line ({err})")
        continue
      raise ValueError(f"{path}:{number}: not a JSON line: {err}") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    rows.append(row)
  return rows


def completed_run_ids(path: str | os.PathLike) -> set[str]:
  """The ``run_id`` of every row already in the results file."""
  return {row["run_id"] for row in read_results(path) if "run_id" in row}


# --- point tables (CSV) ---------------------------------------------------------

POINT_COLUMNS = ("model", "params", "learning_rate", "steps", "noise_batch_ratio", "loss")


def _point_value(column: str, text: str) -> Any:
  """One CSV cell as its column's type; ValueError (without the location) otherwise."""
  from accounting import validate as check  # numpy only: no jax
  if column == "model":
    if not text:
      raise ValueError("model must be a non-empty name, got ''")
    return text
  try:
    number = int(text) if column in ("params", "steps") and text.lstrip("+-").isdigit() \
        else float(text)
  except ValueError:
    raise ValueError(f"{column} must be a number, got {text!r}") from None
  if column in ("params", "steps"):
    return check.integer(column, number, low=1)
  if column == "noise_batch_ratio":
    return check.non_negative(column, number)
  return check.positive(column, number)  # learning_rate, loss


def read_points_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The point rows of a CSV table (format: this module's docstring, "Point tables").

  Args:
    path: the CSV file.

  Returns:
    One dict per row with exactly the keys ``POINT_COLUMNS``: ``model`` str,
    ``params`` and ``steps`` int, the others float (what ``fit.fit_law`` takes).

  Raises:
    ValueError naming the file, the line and the column: a missing, unknown or
    repeated column, an empty file or one without rows, a row with too few or
    too many fields, a value that is not a number or is out of its range, or a
    model name given with two different ``params``.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8-sig", newline="") as f:
    text = f.read()
  reader = csv.reader(text.splitlines(keepends=True))
  header = next((row for row in reader if any(cell.strip() for cell in row)), None)
  if header is None:
    raise ValueError(f"{path}: empty file; expected a header line with the columns "
                     f"{','.join(POINT_COLUMNS)}")
  header_line = reader.line_num
  names = [cell.strip() for cell in header]
  for i, name in enumerate(names):
    if name not in POINT_COLUMNS:
      raise ValueError(f"{path}:{header_line}: column {i + 1}: unknown column {name!r}; the "
                       f"columns are exactly {','.join(POINT_COLUMNS)}")
    if name in names[:i]:
      raise ValueError(f"{path}:{header_line}: column {i + 1}: column {name!r} appears twice")
  missing = [c for c in POINT_COLUMNS if c not in names]
  if missing:
    raise ValueError(f"{path}:{header_line}: missing column(s) {', '.join(missing)}; the "
                     f"columns are exactly {','.join(POINT_COLUMNS)}")
  rows, params_of, first_line = [], {}, {}
  for cells in reader:
    line = reader.line_num
    if not any(cell.strip() for cell in cells):
      continue  # a blank line
    if len(cells) != len(names):
      raise ValueError(f"{path}:{line}: {len(cells)} fields, the header has {len(names)}")
    row = {}
    for name, cell in zip(names, cells):
      try:
        row[name] = _point_value(name, cell.strip())
      except ValueError as err:
        raise ValueError(f"{path}:{line}: column {name!r}: {err}") from None
    seen = params_of.setdefault(row["model"], (row["params"], line))
    if seen[0] != row["params"]:
      raise ValueError(f"{path}:{line}: column 'params': model {row['model']!r} has params "
                       f"{row['params']} here and {seen[0]} on line {seen[1]} (one name, "
                       "one size)")
    key = point_key(row)
    if key in first_line:
      raise ValueError(f"{path}:{line}: the point (model {row['model']!r}, learning_rate "
                       f"{row['learning_rate']:g}, noise_batch_ratio "
                       f"{row['noise_batch_ratio']:g}, steps {row['steps']}) is also on line "
                       f"{first_line[key]} (one row per evaluated point)")
    first_line[key] = line
    rows.append({c: row[c] for c in POINT_COLUMNS})
  if not rows:
    raise ValueError(f"{path}: no rows after the header (one row per evaluated point)")
  return rows


def point_key(row: dict[str, Any]) -> tuple:
  """What identifies an evaluated point: (model, learning_rate, noise_batch_ratio, steps)."""
  return (row["model"], row["learning_rate"], row["noise_batch_ratio"], row["steps"])


# --- several files ---------------------------------------------------------------

def read_inputs(paths) -> list[dict[str, Any]]:
  """The rows of several results files, merged (what ``dpfl fit --results`` reads).

  A path ending in ``.csv`` (any case) is a point table (``read_points_csv``);
  any other is a sweep's JSON-lines file (``read_results``), e.g. one per
  shard of ``dpfl sweep --shard I/N``. Sweep rows are merged by ``run_id``:
  a run found again (in the same or another file) is kept once if the rows
  are equal, and is a ValueError naming both files otherwise (two different
  results for one configuration: merge the right shards, or rerun). Point
  rows are merged the same way by ``point_key`` (within one CSV file a
  repeated point is already an error).

  Returns:
    The rows in file order (a repeated run or point at its first occurrence): point
    rows from CSV files, sweep rows from the others, possibly mixed.
  """
  rows, where = [], {}
  for path in paths:
    path = os.fspath(path)
    if path.lower().endswith(".csv"):
      for row in read_points_csv(path):
        key = ("point", point_key(row))
        if key in where:
          first_path, first = where[key]
          if first != row:
            raise ValueError(
                f"{first_path} and {path} give the point (model {row['model']!r}, "
                f"learning_rate {row['learning_rate']:g}, noise_batch_ratio "
                f"{row['noise_batch_ratio']:g}, steps {row['steps']}) different results "
                f"({first['loss']:g} vs {row['loss']:g}); keep one of them")
          continue
        where[key] = (path, row)
        rows.append(row)
      continue
    for row in read_results(path):
      rid = row.get("run_id")
      if rid is None:
        rows.append(row)
        continue
      if rid in where:
        first_path, first = where[rid]
        if first != row:
          raise ValueError(f"run {rid} is in {first_path} and in {path} with different "
                           "results; keep one of them")
        continue
      where[rid] = (path, row)
      rows.append(row)
  return rows
