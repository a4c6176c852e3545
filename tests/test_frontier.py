"""The frontier's arithmetic (dpo_jax/frontier.py) on points worked out by hand."""

import json
import math

import pytest

from dpo_jax import frontier


def _run(method, seed, points, setting=""):
    return {"method": method, "setting": setting, "seed": seed,
            "points": [{"step": step, "kl": kl, "score": score} for step, kl, score in points]}


def test_the_upper_envelope_keeps_only_points_no_other_beats():
    points = [(0.0, 0.1), (1.0, 0.5), (1.5, 0.4), (2.0, 0.5), (3.0, 0.9), (2.5, 0.95), (10.0, 0.7)]
    # (1.5, 0.4) and (2.0, 0.5) are beaten by (1.0, 0.5); (3.0, 0.9) and (10.0, 0.7) by (2.5, 0.95).
    assert frontier.upper_envelope(points) == [(0.0, 0.1), (1.0, 0.5), (2.5, 0.95)]
    assert frontier.upper_envelope([(1.0, 0.3), (1.0, 0.6)]) == [(1.0, 0.6)]  # a tie in KL: the better score


def test_seed_averaged_points_average_each_setting_and_step_over_seeds():
    runs = [_run("DPO", 0, [(0, 0.0, 0.0), (50, 2.0, 0.4)], "beta=0.1"),
            _run("DPO", 1, [(0, 0.0, 0.0), (50, 4.0, 0.6)], "beta=0.1"),
            _run("DPO", 0, [(50, 1.0, 0.3)], "beta=1")]
    averaged = sorted(frontier.seed_averaged(runs)["DPO"])
    assert averaged == [(0.0, 0.0), (1.0, 0.3), (3.0, 0.5)]


def test_the_budget_table_takes_each_seeds_best_within_the_budget_then_a_t_interval():
    runs = [_run("DPO", 0, [(0, 0.0, 0.1), (50, 0.8, 0.5), (100, 3.0, 0.9)], "beta=0.1"),
            _run("DPO", 0, [(50, 1.9, 0.7)], "beta=1"),  # same seed, another setting: pooled
            _run("DPO", 1, [(0, 0.0, 0.1), (50, 1.5, 0.6), (100, 4.0, 0.8)], "beta=0.1"),
            _run("DPO", 2, [(0, 0.0, 0.1), (50, 0.5, 0.4), (100, 2.5, 0.7)], "beta=0.1"),
            _run("Best-of-N", 0, [(16, 1.84, 0.85)], "N=16")]
    table = {row["method"]: row for row in frontier.budget_table(runs, budgets=(1.0, 2.0, 5.0))}
    dpo = table["DPO"]
    assert dpo["seeds"] == [0, 1, 2]
    assert dpo["budgets"][1.0]["per_seed"] == [0.5, 0.1, 0.4]
    assert dpo["budgets"][2.0]["per_seed"] == [0.7, 0.6, 0.4]
    assert dpo["budgets"][5.0]["per_seed"] == [0.9, 0.8, 0.7]
    # Mean 0.8, sample std 0.1, t(0.975, 2 degrees of freedom) = 4.302653: half-width 4.302653 * 0.1 / sqrt(3).
    cell = dpo["budgets"][5.0]
    assert cell["mean"] == pytest.approx(0.8)
    assert cell["interval"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    best_of_n = table["Best-of-N"]["budgets"]
    assert best_of_n[1.0] == {"mean": None, "interval": None, "per_seed": [None], "only_start": False}  # KL 1.84
    assert best_of_n[2.0]["mean"] == pytest.approx(0.85) and best_of_n[2.0]["interval"] is None  # one seed
    assert frontier.leaders(list(table.values())) == {1.0: ("DPO", pytest.approx(1 / 3)),
                                                      2.0: ("Best-of-N", 0.85), 5.0: ("Best-of-N", 0.85)}
    json.dumps(list(table.values()))  # budgets.json holds it


def test_the_budget_table_reads_as_markdown_with_its_intervals():
    runs = [_run("DPO", seed, [(0, 0.0, 0.1), (50, 1.0, score)]) for seed, score in ((0, 0.5), (1, 0.7))]
    runs.append(_run("Best-of-N", 0, [(4, 0.64, 0.62)], "N=4"))
    runs.append(_run("SFT", 0, [(0, 0.0, 0.1)]))
    table = frontier.budget_table(runs, budgets=(0.5, 1.0))
    assert table[0]["budgets"][0.5]["only_start"] and not table[0]["budgets"][1.0]["only_start"]
    text = frontier.format_budget_table(table)
    lines = text.splitlines()
    assert lines[0] == "| method | seeds | KL ≤ 0.5 | KL ≤ 1 |"
    half_width = 12.706205 * math.sqrt(0.02) / math.sqrt(2)  # t(0.975, 1) * std / sqrt(2)
    # Within 0.5 nats DPO's best is its start, the SFT model, in both seeds: marked, not a DPO score.
    assert lines[2] == f"| DPO | 2 | (SFT) | 0.600 ± {half_width:.3f} |"
    assert lines[3] == "| Best-of-N | 1 |  | 0.620 |"  # nothing within 0.5 nats; one seed, no interval
    assert lines[4] == "| SFT | 1 | 0.100 | 0.100 |"  # the SFT model's own row shows its score
    assert "KL ≤ 0.5: SFT (0.100); KL ≤ 1: Best-of-N (0.620)" in text


def test_the_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the repro extra")
    runs = [_run("DPO", 0, [(0, 0.0, 0.1), (50, 1.0, 0.5), (100, 30.0, 0.9)]),
            _run("PPO", 0, [(0, 0.0, 0.1), (50, 2.0, 0.6)])]
    path = frontier.plot_trajectories(runs, str(tmp_path / "frontier.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
