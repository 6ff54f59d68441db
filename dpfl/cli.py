"""The ``dpfl`` console script: accounting commands plus the training-side ones.

``epsilon`` and ``calibrate`` come from ``accounting.cli`` (JAX-free). The
commands below are implemented in ``dpfl`` and imported only when invoked, so
``dpfl --help`` and ``dpfl epsilon`` never import JAX.
"""

from __future__ import annotations

import sys

from accounting import cli as _accounting_cli

# name -> (one-line help, module with add_arguments / run / format_table)
COMMANDS: dict[str, tuple[str, str]] = {
    "mf": ("matrix-factorization strategy: sensitivity, max/mean loss", "dpfl.mf.cli"),
    "sweep": ("run a DP scaling-law sweep (resumable; one JSON line per run)",
              "dpfl.scaling.sweep_cli"),
    "fit": ("fit a DP scaling law to a sweep's results file", "dpfl.scaling.fit_cli"),
    "audit": ("one-run privacy audit (ε lower bound) of a built-in small model",
              "dpfl.audit.cli"),
    "plan": ("compute-optimal model, batch size and steps for a compute and privacy budget",
             "dpfl.scaling.plan_cli"),
}


def main(argv: list[str] | None = None) -> int:
  """Entry point of the ``dpfl`` console script. Returns the exit status."""
  return _accounting_cli.main(argv, extra_commands=COMMANDS)


if __name__ == "__main__":
  sys.exit(main())
