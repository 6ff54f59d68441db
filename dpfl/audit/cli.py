"""``dpfl audit``: a one-run privacy audit of the built-in small model.

  dpfl audit [--target-epsilon 2] [--canaries 1000] [--inject no-clipping|low-noise] [--json]

Trains ``dpfl.audit.builtin``'s softmax regression once with ``make_private``
(DP-SGD, Poisson sampling, σ calibrated for the target ε) and canaries
inserted, and prints the ε lower bound next to the ledger's ε
(``dpfl.audit.one_run``). ``--inject`` breaks the audit's own run on purpose
(the positive control): a working audit then reports a bound above the claim.
"""

from __future__ import annotations

EXAMPLES = """\
examples:
  dpfl audit --target-epsilon 4 --canaries 1000
  dpfl audit --inject no-clipping --json
  dpfl audit --mode black-box --noise-multiplier 1.5 --seed 3"""


def add_arguments(p) -> None:
  p.add_argument("--target-epsilon", type=float, metavar="E",
                 help="the ε the run is calibrated for (default 2 unless --noise-multiplier)")
  p.add_argument("--noise-multiplier", type=float, metavar="SIGMA",
                 help="σ instead of a target ε (the claim is then the ledger's ε for it)")
  p.add_argument("--accountant", choices=("pld", "rdp"), default="pld",
                 help="the accountant whose ε is the claim (default pld)")
  p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
  p.add_argument("--canaries", type=int, default=1000, metavar="M",
                 help="number of canaries, each included with probability 1/2 (default 1000)")
  p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
  p.add_argument("--batch-size", type=int, default=100,
                 help="expected batch size (default 100)")
  p.add_argument("--dataset-size", type=int, default=1000, metavar="N",
                 help="real training examples (default 1000; q = batch size / N)")
  p.add_argument("--clip-norm", type=float, default=1.0, metavar="C",
                 help="L2 clip norm (default 1)")
  p.add_argument("--mode", choices=("white-box", "black-box"), default="white-box",
                 help="gradient canaries scored along each step's update (white-box, "
                      "default) or input canaries scored by the final loss (black-box)")
  p.add_argument("--canary-type", choices=("dirac", "params"), default="dirac",
                 help="white-box canaries: an extra parameter block (dirac, default) or "
                      "random directions in the model's parameters")
  p.add_argument("--inject", choices=("no-clipping", "low-noise"),
                 help="positive control: break the audit's run (canaries unclipped, or "
                      "noise 10x below the ledger's); the claimed ε is unchanged")
  p.add_argument("--confidence", type=float, default=0.95,
                 help="confidence of the lower bound, in (0, 1) (default 0.95)")
  p.add_argument("--seed", type=int,
                 help="seed for the noise, the sampling and the canaries (default: fresh)")


def run(args) -> dict:
  import numpy as np  # deferred: --help stays light
  from accounting import validate as check
  check.positive_int("--canaries", args.canaries)
  check.positive_int("--steps", args.steps)
  check.open_unit("--confidence", args.confidence)
  if args.seed is not None:
    check.integer("--seed", args.seed, low=0)
  seeds = np.random.SeedSequence(args.seed).generate_state(3)
  from dpfl.audit import builtin, one_run
  target = args.target_epsilon
  if target is None and args.noise_multiplier is None:
    target = 2.0
  private = builtin.make_run(target_epsilon=target, noise_multiplier=args.noise_multiplier,
                             accountant=args.accountant, delta=args.delta,
                             dataset_size=args.dataset_size, batch_size=args.batch_size,
                             num_steps=args.steps, l2_clip_norm=args.clip_norm,
                             key=int(seeds[0]), seed=int(seeds[1]))
  extra = {}
  if args.mode == "black-box":
    extra = dict(canary_examples=builtin.canary_examples(args.canaries, seed=int(seeds[2])),
                 loss_fn=builtin.loss_fn)
  else:
    extra = dict(canaries=args.canary_type)
  result = one_run(private, builtin.init_params(), builtin.dataset(args.dataset_size),
                   num_canaries=args.canaries, mode=args.mode, confidence=args.confidence,
                   seed=int(seeds[2]), inject=args.inject, **extra)
  return result.to_dict()


def format_table(result: dict) -> str:
  verdict = ("VIOLATED: the bound exceeds the claim" if result["violated"]
             else "consistent: the bound is at most the claim")
  inject = f", injected fault: {result['inject']}" if result["inject"] else ""
  kind = f" ({result['canaries']} canaries)" if result["canaries"] else ""
  return "\n".join([
      f"dpfl audit: one run, {result['mode']}{kind}{inject}",
      f"  claimed ε (ledger, δ={result['delta']:g})  {result['claimed_epsilon']:.4f}",
      f"  ε lower bound ({result['confidence']:.0%} confidence)  "
      f"{result['epsilon_lower_bound']:.4f}",
      f"  canaries {result['num_canaries']} ({result['num_included']} included); guesses "
      f"{result['num_guesses']} (top {result['k_plus']} in, bottom {result['k_minus']} out), "
      f"{result['num_correct']} correct, {result['num_abstentions']} abstentions; "
      f"{result['guess_pairs_tested']} (k+, k-) pairs tested",
      f"  {verdict}"])
