"""The reward-KL frontier from run trajectories: envelopes, the KL-budget table over seeds, the plot.

A trajectory is a run's points in step order, each a policy evaluated on the same held-out prompts
with common random numbers (`evaluation.evaluate_policy` with one seed): {"step", "kl",
"kl_standard_error", "score", "score_std"}. A run is {"method", "setting", "seed", "points"}.

    table = budget_table(runs, budgets=(1, 2, 5, 10))   # each method's best score within each KL
    write_budget_table(table, path)                     # Markdown, with confidence intervals over seeds
    plot_trajectories(runs, path)                       # each run's path and each method's envelope

- `upper_envelope`: the points no other point beats, i.e. one with lower or equal KL and a higher score.
- `budget_table`: for each method and seed, the best score of the method's points (every setting,
  every step) whose KL estimate is within the budget; then the mean over seeds and a t-interval.
  Every run starts at the SFT model (step 0, KL 0), so a method's value is never below it; a cell
  whose best is that start in every seed is marked, since the method's own points all lie beyond.
"""

import collections
import math

import numpy as np
from scipy import stats

from dpo_jax import storage


def upper_envelope(points):
    """The (kl, score) pairs of `points` that no other point dominates (KL <= and score >), in
    increasing KL (and score)."""
    envelope = []
    for kl, score in sorted(points, key=lambda point: (point[0], -point[1])):
        if not envelope or score > envelope[-1][1]:
            envelope.append((kl, score))
    return envelope


def seed_averaged(runs):
    """{method: [(kl, score)]}: each (setting, step)'s KL and score averaged over the seeds that
    reached it, the points a method's envelope is drawn through (so a method run with more seeds
    does not get a higher envelope from more draws)."""
    grouped = collections.defaultdict(list)
    for run in runs:
        for point in run["points"]:
            grouped[(run["method"], run["setting"], point["step"])].append((point["kl"], point["score"]))
    averaged = collections.defaultdict(list)
    for (method, _, _), values in grouped.items():
        averaged[method].append(tuple(np.mean(values, axis=0).tolist()))
    return dict(averaged)


def mean_and_interval(values, confidence=0.95):
    """(mean, half-width of the Student-t confidence interval of the mean); the half-width is None
    for a single value."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), None
    half_width = stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half_width)


def budget_table(runs, budgets, confidence=0.95):
    """Rows {"method", "seeds", "budgets": {budget: {"mean", "interval", "per_seed", "only_start"}}},
    in the methods' first-seen order. per_seed: each seed's best score within the budget (None where
    no point of that seed is within it, e.g. a Best-of-N whose analytic KL exceeds it); mean and
    interval over the seeds with a value; only_start: every seed's best is a step-0 point (the SFT
    model), none of the method's own points being within the budget."""
    by_method = collections.defaultdict(lambda: collections.defaultdict(list))
    for run in runs:
        by_method[run["method"]][run["seed"]] += run["points"]
    rows = []
    for method, seeds in by_method.items():
        row = {"method": method, "seeds": sorted(seeds), "budgets": {}}
        for budget in budgets:
            best = [max((point for point in seeds[seed] if point["kl"] <= budget), default=None,
                        key=lambda point: (point["score"], point["step"])) for seed in row["seeds"]]
            per_seed = [None if point is None else point["score"] for point in best]
            reached = [value for value in per_seed if value is not None]
            mean, interval = mean_and_interval(reached, confidence) if reached else (None, None)
            row["budgets"][float(budget)] = {"mean": mean, "interval": interval, "per_seed": per_seed,
                                             "only_start": bool(reached) and all(
                                                 point is None or point["step"] == 0 for point in best)}
        rows.append(row)
    return rows


def _only_start(row, cell):
    """Whether a cell's value is the SFT start of a method that has no point of its own within it."""
    return cell["only_start"] and row["method"] != "SFT"


def leaders(table):
    """{budget: (method, mean)}: the method with the highest mean score within each budget, of those
    with points of their own there (the SFT model where none has)."""
    best = {}
    for row in table:
        for budget, cell in row["budgets"].items():
            if cell["mean"] is None or _only_start(row, cell):
                continue
            if budget not in best or cell["mean"] > best[budget][1]:
                best[budget] = (row["method"], cell["mean"])
    return best


def format_budget_table(table, confidence=0.95):
    """The table as Markdown: one line per method, one column per budget, "mean ± half-width"."""
    budgets = list(table[0]["budgets"]) if table else []
    lines = ["| method | seeds | " + " | ".join(f"KL ≤ {budget:g}" for budget in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for row in table:
        cells = []
        for budget in budgets:
            cell = row["budgets"][budget]
            if cell["mean"] is None:
                cells.append("")
            elif _only_start(row, cell):
                cells.append("(SFT)")
            else:
                cells.append(f"{cell['mean']:.3f}" + (f" ± {cell['interval']:.3f}" if cell["interval"] is not None
                                                       else ""))
        lines.append(f"| {row['method']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    best = leaders(table)
    lines += ["", f"Mean over seeds of each seed's best held-out score among the method's points (every setting, every "
              f"evaluated step) with KL to the SFT model within the budget; ± the {confidence:.0%} Student-t "
              "interval of that mean (none for one seed). (SFT): no point of the method's own (past step 0) is "
              "within the budget, so its best is the SFT model it started from.", "",
              "Highest mean per budget: " + "; ".join(f"KL ≤ {budget:g}: {method} ({mean:.3f})"
                                                       for budget, (method, mean) in sorted(best.items())) + "."]
    return "\n".join(lines) + "\n"


def write_budget_table(table, path, confidence=0.95):
    storage.write_text(path, format_budget_table(table, confidence), only_process_zero=False)
    return path


def plot_trajectories(runs, path):
    """The frontier (PNG): each run's trajectory (thin, its points joined in step order) and each
    method's upper envelope of its seed-averaged points (thick, a staircase: the best score within
    each KL), score against KL on a symlog axis."""
    from dpo_jax.evaluation import figure  # matplotlib, imported only to plot

    fig, axes = figure(size=(7.5, 5))
    colours = {}
    for run in runs:
        colour = colours.setdefault(run["method"], f"C{len(colours) % 10}")
        points = sorted(run["points"], key=lambda point: point["step"])
        axes.plot([point["kl"] for point in points], [point["score"] for point in points], color=colour,
                  alpha=0.3, linewidth=0.8, marker=".", markersize=3)
    for method, points in seed_averaged(runs).items():
        envelope = upper_envelope(points)
        # As steps: the envelope at x is the best score within a budget of x nats, no interpolation.
        axes.plot(*zip(*envelope), color=colours[method], linewidth=2.2, marker="o", markersize=4, label=method,
                  drawstyle="steps-post")
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set_xlabel(r"KL($\pi \,\|\, \pi_\mathrm{SFT}$) per sequence (nats)")
    axes.set_ylabel("mean reward of held-out samples")
    axes.set_title("Reward vs KL: trajectories (thin) and each method's frontier (thick)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    storage.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=150), only_process_zero=False)
    return path
