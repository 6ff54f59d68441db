"""Empirical privacy auditing: ``one_run`` (Steinke, Nasr & Jagielski 2023) and its bound."""

from dpfl.audit.bound import (DEFAULT_CONFIDENCE, default_guess_grid, epsilon_lower_bound,
                              epsilon_lower_bound_from_scores, max_epsilon_lower_bound,
                              p_value)
from dpfl.audit.one_run import AuditResult, one_run

__all__ = ["AuditResult", "DEFAULT_CONFIDENCE", "default_guess_grid", "epsilon_lower_bound",
           "epsilon_lower_bound_from_scores", "max_epsilon_lower_bound", "one_run", "p_value"]
