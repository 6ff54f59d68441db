"""Analysis and report of ``benchmarks/scaling_study.py`` (which sets up sys.path first).

Three findings of McKenna et al. 2025 (arXiv 2501.18914), each decided by a
stated criterion on this study's numbers:

(a) σ/B drives utility: measured directly, no law involved.
(b) compute-optimal private models are smaller, with larger batches, than
    non-private ones: the private optimum is the fitted law's, queried only
    inside what the sweep measured (its models and batch sizes, steps within
    each model's fitted range, σ/B at most the largest swept; σ from the σ
    grid); the non-private optimum is measured (the best eval point of the
    non-private runs within the same compute). The law, like the paper's,
    sees the batch only through σ/B, so it cannot rank non-private batches.
(c) more ε alone gives diminishing returns: the same in-support private
    optima across ε at fixed compute, with σ/B = 0 as the ε = ∞ limit.

The shipped planner (``dpfl.scaling.planner.plan``) is also queried as is
and shown, flagged where it extrapolates.
"""

from __future__ import annotations

import math
import os

import numpy as np

from dpfl.scaling import models


def final_loss(row) -> float:
  value = row.get("final_eval_loss")
  return math.nan if value is None else float(value)


def best_over_learning_rates(rows: list[dict]) -> list[dict]:
  """Per (model, batch, σ/B, steps): the run with the lowest final eval loss."""
  best: dict[tuple, dict] = {}
  for r in rows:
    key = (r["model"], r["batch_size"], round(r["noise_batch_ratio"], 12), r["steps"])
    if key not in best or final_loss(r) < final_loss(best[key]):
      best[key] = r
  return list(best.values())


# --- (a) --------------------------------------------------------------------------------

def finding_ratio_drives_utility(rows: list[dict]) -> dict:
  """(a) At fixed steps, runs sharing σ/B (but not B, nor σ) should have similar loss.

  Per model, on the best run over learning rates of each cell: the largest
  spread of final eval loss across batch sizes at one σ/B ("within"), against
  the range across σ/B of the per-ratio means ("across"). Holds where
  within < 25% of across for every model.
  """
  per_model = {}
  best = best_over_learning_rates(rows)
  for model in sorted({r["model"] for r in best}, key=models.params_count):
    groups: dict[float, dict[int, float]] = {}
    for r in best:
      if r["model"] == model and r["private"]:
        groups.setdefault(round(r["noise_batch_ratio"], 12), {})[r["batch_size"]] = final_loss(r)
    shared = [by_b for by_b in groups.values() if len(by_b) >= 2]
    if len(groups) < 2 or not shared:
      continue
    within = max(max(v.values()) - min(v.values()) for v in shared)
    means = [float(np.mean(list(v.values()))) for v in groups.values()]
    per_model[model] = {"within_ratio_spread": within,
                        "across_ratio_spread": max(means) - min(means)}
  if not per_model:
    return {"holds": None, "why": "no model has two batch sizes at one σ/B", "per_model": {}}
  worst = max(v["within_ratio_spread"] / max(v["across_ratio_spread"], 1e-12)
              for v in per_model.values())
  return {"holds": bool(worst < 0.25), "worst_within_over_across": worst,
          "per_model": per_model}


# --- the law inside its support, and the planner as shipped --------------------------------

def _in_support(law, c: dict, ratio: np.ndarray) -> np.ndarray:
  from dpfl.scaling import fit
  ok = np.zeros(len(ratio), bool)
  for k, name in enumerate(c["models"]):
    mine = c["model_index"] == k
    out = fit.extrapolation(law, name, c["steps"][mine], ratio[mine])
    ok[mine] = ~(out["steps"] | out["noise_batch_ratio"])
  return ok


def supported_optima(law, *, computes, epsilons, delta, users, seq_len, grid=None,
                     batch_sizes=None) -> dict:
  """{ε (math.inf: σ/B = 0): [best in-support config at each compute, or None]}.

  Candidates are the planner's (``planner.candidates``: the law's models ×
  ``batch_sizes`` × the steps ladder, within the budget), kept where the law
  interpolates (``fit.extrapolation`` is False).
  """
  from dpfl.scaling import fit, planner
  table = {}
  for eps in [*epsilons, math.inf]:
    row = []
    for compute in computes:
      try:  # the planner's enumeration (model × batch × steps ladder within budget)
        c = planner.candidates(compute=float(compute), epsilon=float(min(eps, max(epsilons))),
                               delta=delta, users=users, law=law, seq_len=seq_len, grid=grid,
                               batch_sizes=batch_sizes, models=list(fit.model_params(law)))
      except ValueError:
        row.append(None)
        continue
      private = math.isfinite(eps)
      ratio = c["noise_batch_ratio"] if private else np.zeros(len(c["steps"]))
      loss = c["predicted_loss"] if private else fit.predict(law, c["params"], c["steps"], 0.0)
      ok = np.nonzero(_in_support(law, c, ratio))[0]
      if not len(ok):
        row.append(None)
        continue
      i = int(ok[np.lexsort((c["flops"][ok], loss[ok]))[0]])
      row.append({"model": c["models"][int(c["model_index"][i])], "params": int(c["params"][i]),
                  "batch_size": int(c["batch_size"][i]), "steps": int(c["steps"][i]),
                  "noise_multiplier": float(c["noise_multiplier"][i]) if private else 0.0,
                  "noise_batch_ratio": float(ratio[i]), "predicted_loss": float(loss[i]),
                  "compute": float(c["flops"][i])})
    table[eps] = row
  return table


def shipped_planner(law, *, computes, epsilon, delta, users, seq_len, grid=None) -> list:
  """``planner.plan`` as shipped, allowed to extrapolate (what it extrapolates is
  named), at one ε."""
  from dpfl.scaling import planner
  out = []
  for compute in computes:
    try:
      out.append(planner.plan(compute=float(compute), epsilon=float(epsilon), delta=delta,
                              users=users, law=law, seq_len=seq_len, grid=grid,
                              allow_extrapolation=True))
    except ValueError:
      out.append(None)
  return out


def nonprivate_frontier(rows: list[dict], computes, warmup_steps: int) -> list[dict | None]:
  """Measured: the best non-private eval point with at most each compute."""
  out = []
  for compute in computes:
    best = None
    for r in rows:
      if r["private"]:
        continue
      for step, loss in r["eval_loss"]:
        flops = models.training_flops(params=r["params"], num_steps=step,
                                      batch_size=r["batch_size"], seq_len=r["seq_len"])
        if step > warmup_steps and loss is not None and flops <= compute and (
            best is None or loss < best["loss"]):
          best = {"model": r["model"], "batch_size": r["batch_size"], "steps": step,
                  "loss": loss}
    out.append(best)
  return out


# --- (b), (c) ---------------------------------------------------------------------------------

def finding_smaller_models_larger_batches(optima: dict, frontier: list, computes) -> dict:
  """(b) Private optimum (law, in support) vs the measured non-private optimum, same compute.

  Holds if the private model is strictly smaller in >= 50% of the (ε,
  compute) comparisons and its batch strictly larger in >= 50%.
  """
  comparisons = []
  for eps, row in optima.items():
    if not math.isfinite(eps):
      continue
    for compute, p, q in zip(computes, row, frontier):
      if p is not None and q is not None:
        comparisons.append({"epsilon": eps, "compute": float(compute), "private": p,
                            "nonprivate": q})
  if not comparisons:
    return {"holds": None, "why": "no compute with both a private optimum inside the swept "
            "region and a measured non-private run", "comparisons": []}
  size = {c["nonprivate"]["model"]: models.params_count(c["nonprivate"]["model"])
          for c in comparisons}
  smaller = float(np.mean([c["private"]["params"] < size[c["nonprivate"]["model"]]
                           for c in comparisons]))
  not_larger = float(np.mean([c["private"]["params"] <= size[c["nonprivate"]["model"]]
                              for c in comparisons]))
  larger_batch = float(np.mean([c["private"]["batch_size"] > c["nonprivate"]["batch_size"]
                                for c in comparisons]))
  not_smaller_batch = float(np.mean([c["private"]["batch_size"] >= c["nonprivate"]["batch_size"]
                                     for c in comparisons]))
  return {"strictly_smaller_model_fraction": smaller, "not_larger_model_fraction": not_larger,
          "larger_batch_fraction": larger_batch, "not_smaller_batch_fraction": not_smaller_batch,
          "holds_model": smaller >= 0.5, "holds_batch": larger_batch >= 0.5,
          "holds": smaller >= 0.5 and larger_batch >= 0.5, "comparisons": comparisons}


def finding_diminishing_epsilon(optima: dict, computes) -> dict:
  """(c) At fixed compute, the last doublings of ε buy less loss than the first ones.

  With ε doubling along the list: the loss gained over the first two steps
  against the last two (first vs last step with fewer than four ε). Holds at
  a compute where the late gain is smaller; overall where it holds at >= half.
  """
  epsilons = sorted(e for e in optima if math.isfinite(e))
  span = 2 if len(epsilons) >= 5 else 1
  per_compute = []
  for j, compute in enumerate(computes):
    points = [optima[e][j] for e in epsilons]
    if any(p is None for p in points) or len(points) < 2 * span + 1:
      continue
    losses = [p["predicted_loss"] for p in points]
    early, late = losses[0] - losses[span], losses[-1 - span] - losses[-1]
    public = optima.get(math.inf, [None] * len(computes))[j]
    per_compute.append({"compute": float(compute), "losses": losses, "early_gain": early,
                        "late_gain": late, "diminishing": bool(late < early),
                        "nonprivate_loss": public["predicted_loss"] if public else None})
  if not per_compute:
    return {"holds": None, "why": "no compute with an in-support optimum at every ε",
            "per_compute": []}
  share = float(np.mean([p["diminishing"] for p in per_compute]))
  return {"holds": share >= 0.5, "diminishing_fraction": share, "epsilons": epsilons,
          "span": span, "per_compute": per_compute}


# --- plot and report ---------------------------------------------------------------------------

def plot_final_loss_vs_ratio(rows: list[dict], path: str) -> str:
  """Measured final eval loss (best over learning rates) vs σ/B; non-private dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  best = best_over_learning_rates(rows)
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  names = sorted({r["model"] for r in best}, key=models.params_count)
  colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(names), 1)))
  for color, name in zip(colors, names):
    for mark, b in zip("os^Dv", sorted({r["batch_size"] for r in best})):
      mine = [r for r in best if r["model"] == name and r["batch_size"] == b]
      pts = sorted((r["noise_batch_ratio"], final_loss(r)) for r in mine if r["private"])
      if pts:
        ax.plot(*zip(*pts), marker=mark, color=color, lw=0.8, label=f"{name}, B={b}")
      for r in mine:
        if not r["private"]:
          ax.axhline(final_loss(r), color=color, ls="--", lw=0.6)
  ax.set_xscale("log")
  ax.set_xlabel("noise-batch ratio σ/B")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title("measured: same σ/B, different B (dashed: non-private)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def verdict(value) -> str:
  return {True: "**holds**", False: "**does not hold**", None: "**not testable**"}[value]


def _config(p: dict | None) -> str:
  if p is None:
    return "-"
  return f"{p['model']}, B={p['batch_size']}, T={p['steps']}"


def _tokens(value) -> str:
  return "-" if value is None else f"{value:,.0f}"


def runs_table(rows) -> list[str]:
  lines = ["| model | params | B | σ | σ/B | T | lr | ε | final eval loss | tokens/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["params"], r["batch_size"], r["noise_batch_ratio"],
                                       r["learning_rate"])):
    eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
    lines.append(f"| {r['model']} | {r['params']:,} | {r['batch_size']} | "
                 f"{r['noise_multiplier']:.3g} | {r['noise_batch_ratio']:.3g} | {r['steps']} | "
                 f"{r['learning_rate']:g} | {eps} | {final_loss(r):.4f} | "
                 f"{r['tokens_per_second']:,.0f} |")
  return lines


def findings_text(findings: dict, computes, any_batch, shipped, shipped_epsilon) -> list[str]:
  a, b, c = findings["ratio"], findings["smaller"], findings["epsilon"]
  lines = ["## Findings of McKenna et al. 2025 at this scale", "",
           f"### (a) The noise-batch ratio σ/B drives utility: {verdict(a['holds'])}", ""]
  if a.get("per_model"):
    lines += ["| model | loss spread across B at equal σ/B | loss range across σ/B |",
              "|---|---|---|"]
    lines += [f"| {m} | {v['within_ratio_spread']:.3f} | {v['across_ratio_spread']:.3f} |"
              for m, v in a["per_model"].items()]
    lines += ["", "Final eval loss at equal steps, best over learning rates. Criterion: the "
              "spread across batch sizes sharing σ/B is below 25% of the range across σ/B "
              f"(worst model: {a['worst_within_over_across']:.0%}). Larger batches at equal σ/B "
              "also see more tokens, so some spread is expected from data alone."]
  else:
    lines.append(a.get("why", ""))
  if "holds_model" in b:
    lines += ["", f"### (b) Compute-optimal private models are smaller: "
              f"{verdict(b['holds_model'])}; with larger batches: {verdict(b['holds_batch'])}",
              ""]
  else:
    lines += ["", "### (b) Compute-optimal private models are smaller, with larger batches: "
              f"{verdict(b['holds'])}", ""]
  if b.get("comparisons"):
    lines += ["| ε | compute | private optimum (law, swept batches) | "
              "private optimum (law, any batch) | non-private optimum (measured) |",
              "|---|---|---|---|---|"]
    shown = sorted({x["epsilon"] for x in b["comparisons"]})
    shown = {shown[0], shown[len(shown) // 2], shown[-1]}  # the table: three ε, all counted
    for x in b["comparisons"]:
      if x["epsilon"] not in shown:
        continue
      j = [float(c) for c in computes].index(x["compute"])
      free = any_batch.get(x["epsilon"], [None] * len(computes))[j] if any_batch else None
      lines.append(f"| {x['epsilon']:g} | {x['compute']:.2g} | {_config(x['private'])} | "
                   f"{_config(free)} | {_config(x['nonprivate'])} |")
    lines += ["", "Private: the fitted law's optimum inside what the sweep measured (its models "
              "and batch sizes, steps within each model's fitted range, σ/B up to the largest "
              "swept; σ from the σ grid). Non-private: the best measured eval point within "
              "the same compute. Over all ε of (c): private model strictly smaller in "
              f"{b['strictly_smaller_model_fraction']:.0%} of the comparisons (not larger in "
              f"{b['not_larger_model_fraction']:.0%}): {verdict(b['holds_model'])}; batch "
              f"strictly larger in {b['larger_batch_fraction']:.0%} (not smaller in "
              f"{b['not_smaller_batch_fraction']:.0%}): {verdict(b['holds_batch'])} "
              "(criterion: >= 50% each). The law, like the paper's, sees the batch only "
              "through σ/B, so it cannot rank non-private batch sizes; the any-batch column "
              "shows where the law alone would take private training (power-of-two batches)."]
  else:
    lines.append(b.get("why", ""))
  lines += ["", f"### (c) More ε alone gives diminishing returns: {verdict(c['holds'])}", ""]
  if c.get("per_compute"):
    eps = c["epsilons"]
    lines += ["| compute | " + " | ".join(f"ε={e:g}" for e in eps) + " | non-private |",
              "|---|" + "---|" * (len(eps) + 1)]
    for p in c["per_compute"]:
      public = "-" if p["nonprivate_loss"] is None else f"{p['nonprivate_loss']:.4f}"
      lines.append(f"| {p['compute']:.2g} | " + " | ".join(f"{v:.4f}" for v in p["losses"])
                   + f" | {public} |")
    lines += ["", "Best in-support predicted loss at fixed compute (non-private: σ/B = 0, the "
              "ε = ∞ limit of the same search). Criterion: the loss gained "
              f"over the last {c['span']} doubling(s) of ε is below that of the first "
              f"{c['span']}, at >= 50% of computes (here {c['diminishing_fraction']:.0%})."]
  else:
    lines.append(c.get("why", ""))
  if shipped:
    lines += ["", f"### The planner as shipped (ε = {shipped_epsilon:g}, may extrapolate)", "",
              "| compute | optimum | predicted loss | extrapolated |", "|---|---|---|---|"]
    for compute, p in zip(computes, shipped):
      if p is not None:
        flags = ", ".join(p["extrapolated"] + p.get("at_support_corner", [])) or "no"
        lines.append(f"| {compute:.2g} | {_config(p)} | {p['predicted_loss']:.4f} | {flags} |")
  return lines


def speed_text(speed: list[dict]) -> list[str]:
  if not speed:
    return []
  lines = ["## Speed: DP-SGD step vs non-private step, same model and batch", "",
           "| model | B (padded) | DP tokens/s | non-private tokens/s | DP slowdown | "
           "naive one-pass non-private tokens/s |", "|---|---|---|---|---|---|"]
  for s in speed:
    lines.append(f"| {s['model']} | {s['batch_size']} ({s['max_batch_size']}) | "
                 f"{s['dp_tokens_per_second']:,.0f} | {s['plain_tokens_per_second']:,.0f} | "
                 f"{s['dp_slowdown']:.2f}x | {_tokens(s['naive_plain_tokens_per_second'])} |")
  lines += ["", f"Median of {speed[0]['repeats']} interleaved repetitions after compilation, "
            "in the same process as the sweep. Tokens are the expected real tokens B·seq (the "
            "DP step also computes the Poisson padding up to the static batch shape). The "
            "non-private step accumulates gradients over blocks of <= 32 sequences, as the "
            "sweep does; a naive one-pass `jax.grad` is shown where measured, because on CPU "
            "it is several times slower at large batches."]
  return lines


def write_report(path: str, *, title: str, intro: str, rows, findings, computes, any_batch,
                 shipped, shipped_epsilon, speed, plots, notes) -> None:
  lines = [f"# {title}", "", intro, "", "## Runs", "", *runs_table(rows), "",
           *findings_text(findings, computes, any_batch, shipped, shipped_epsilon), "",
           *speed_text(speed)]
  if plots:
    lines += ["", "## Plots", ""] + [f"![{name}]({os.path.basename(p)})" for name, p in plots]
  if notes:
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
