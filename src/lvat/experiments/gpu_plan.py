"""How `lvat gpu-study` sizes itself: updates per method from the bench and a time budget.

Sizing rule (`plan_study`). The budget counts from the study's start (Python and torch already
imported); time left = budget - time spent so far (data, bench, fit timing).

- The Glow fit gets its config's updates, or as many as fit in `fit_share` of the time left
  (warm-up cut in proportion). Cost: updates x the timed ms/update, plus its final evaluation
  (one update's time per batch of test images), plus `job_overhead_s`.
- Every method gets the same number of updates N, so that the methods differ in nothing but
  the method: the largest multiple of 3 with
      N x (ms_sup + ms_vat + ms_lvat-glow) <= safety x (time left - Glow fit - 3 x run overhead)
  where a run's overhead is `job_overhead_s` plus 3 evaluations, each costed as training on as
  many images (test + validation) at the bench's sup-160 ms/step. N is capped at `max_steps`
  (the paper's 48,000). Below `min_steps` the study stops before training anything and says
  what budget would do: fewer updates for one method would confound the comparison.
- The lr decays linearly to 0 over the last N/3 updates, beta1 0.5 there (paper: the last
  16,000 of 48,000); evaluations at N/3, 2N/3 and N; one checkpoint, at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lvat.errors import ConfigError

__all__ = ["EVALS", "PAPER_STEPS", "ROWS", "Plan", "plan_study"]

ROWS = ("sup", "vat", "lvat-glow")  # bench rows, and the config files configs/gpu-study/ROW.toml
PAPER_STEPS = 48_000  # SVHN's updates (docs/method.md §5.1): the cap on N
EVALS = 3  # per run: at N/3, 2N/3 (where the lr decay starts) and N


@dataclass
class Plan:
    """The sizing of one study (see the module docstring for the rule)."""

    steps: int  # N, every method
    fit_steps: int  # Glow fit updates; 0 = no fit
    ms_per_step: dict[str, float]  # bench rows, and "glow-fit" when fitting
    seconds: dict[str, float]  # estimated: "spent" so far, "glow-fit", each row, "total"
    budget_s: float

    @property
    def decay_steps(self) -> int:
        return self.steps // 3

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // EVALS)

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "decay_steps": self.decay_steps,
            "eval_every": self.eval_every,
            "fit_steps": self.fit_steps,
            "ms_per_step": self.ms_per_step,
            "estimated_s": {k: round(v, 1) for k, v in self.seconds.items()},
            "budget_s": self.budget_s,
        }

    def text(self) -> str:
        s = self.seconds
        lines = [
            f"plan: every method {self.steps:,} updates (lr decay over the last "
            f"{self.decay_steps:,}, evaluations every {self.eval_every:,}); estimated "
            f"{s['total']:.0f} s of the {self.budget_s:g} s budget, {s['spent']:.0f} s spent so far"
        ]
        if self.fit_steps:
            lines.append(
                f"  glow fit   {self.fit_steps:>7,} updates x {self.ms_per_step['glow-fit']:8.2f} "
                f"ms  ~ {s['glow-fit']:6.1f} s"
            )
        for row in ROWS:
            lines.append(
                f"  {row:<10} {self.steps:>7,} updates x {self.ms_per_step[row]:8.2f} ms  ~ "
                f"{s[row]:6.1f} s"
            )
        return "\n".join(lines)


def plan_study(
    budget_s: float,
    spent_s: float,
    ms: dict[str, float],
    *,
    eval_s: float,
    fit_ms: float = 0.0,
    fit_steps: int = 0,
    fit_eval_s: float = 0.0,
    overhead_s: float = 5.0,
    fit_share: float = 0.25,
    safety: float = 0.9,
    max_steps: int = PAPER_STEPS,
    min_steps: int = 300,
) -> Plan:
    """Updates per method (and for the Glow fit) by the module docstring's rule.

    Args:
        ms: ms per training update of each method (the bench's rows).
        eval_s: seconds of one evaluation of a run (test + validation images).
        fit_ms, fit_steps, fit_eval_s: ms per Glow fit update, the fit config's updates (0: no
            fit) and its final evaluation's seconds.
    """
    left = budget_s - spent_s
    seconds = {"spent": spent_s}
    n_fit = 0
    if fit_steps:
        fixed = fit_eval_s + overhead_s
        room = fit_share * left - fixed
        n_fit = min(fit_steps, int(room * 1e3 / fit_ms)) if room > 0 else 0
        if n_fit < 1:
            raise ConfigError(
                f"--budget-s {budget_s:g}: {left:.0f} s left after {spent_s:.0f} s of bench, but "
                f"the Glow fit alone needs about {(fixed + fit_ms / 1e3) / fit_share:.0f} s"
            )
        seconds["glow-fit"] = n_fit * fit_ms / 1e3 + fixed
    run_fixed = overhead_s + EVALS * eval_s
    per_step = sum(ms.values()) / 1e3  # seconds for one update of every method
    room = left - seconds.get("glow-fit", 0.0) - len(ms) * run_fixed
    n = min(max_steps, int(safety * room / per_step)) if room > 0 else 0
    n -= n % 3  # the decay is exactly the last third
    if n < max(min_steps, 3):
        need = budget_s - room + max(min_steps, 3) * per_step / safety
        raise ConfigError(
            f"--budget-s {budget_s:g}: leaves {max(n, 0)} updates per method, fewer than "
            f"--min-steps {min_steps}; about {math.ceil(need)} s would do"
        )
    for row, m in ms.items():
        seconds[row] = n * m / 1e3 + run_fixed
    seconds["total"] = sum(seconds.values())
    rates = dict(ms, **({"glow-fit": fit_ms} if fit_steps else {}))
    return Plan(n, n_fit, rates, seconds, budget_s)
