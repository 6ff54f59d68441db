"""dpfl.scaling: DP scaling-law studies (McKenna et al. 2025, arXiv 2501.18914).

A model family (``models``), an offline corpus (``corpus``), sweeps that
write one JSON line per run (``sweep``, ``results``), and fitting/planning on
top of them. Names are re-exported lazily (PEP 562) so that importing this
package, e.g. for ``dpfl plan``, does not import JAX or Flax.
"""

import importlib

_EXPORTS = {
    # models
    "MODELS": "dpfl.scaling.models", "ModelConfig": "dpfl.scaling.models",
    "Transformer": "dpfl.scaling.models", "get_config": "dpfl.scaling.models",
    "init_params": "dpfl.scaling.models", "make_loss_fn": "dpfl.scaling.models",
    "make_model": "dpfl.scaling.models", "model_names": "dpfl.scaling.models",
    "params_count": "dpfl.scaling.models", "training_flops": "dpfl.scaling.models",
    # corpus
    "BOS": "dpfl.scaling.corpus", "VOCAB_SIZE": "dpfl.scaling.corpus",
    "Corpus": "dpfl.scaling.corpus", "decode": "dpfl.scaling.corpus",
    "encode": "dpfl.scaling.corpus", "load_corpus": "dpfl.scaling.corpus",
    # results
    "ResultRow": "dpfl.scaling.results", "SCHEMA_VERSION": "dpfl.scaling.results",
    "append_result": "dpfl.scaling.results", "read_results": "dpfl.scaling.results",
    "validate_row": "dpfl.scaling.results", "read_points_csv": "dpfl.scaling.results",
    "read_inputs": "dpfl.scaling.results",
    # sweeps
    "RunConfig": "dpfl.scaling.sweep", "SweepSummary": "dpfl.scaling.sweep",
    "make_grid": "dpfl.scaling.sweep", "run_id": "dpfl.scaling.sweep",
    "run_sweep": "dpfl.scaling.sweep", "train_run": "dpfl.scaling.sweep",
    "shard_configs": "dpfl.scaling.shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'dpfl.scaling' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
