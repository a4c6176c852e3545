"""The DPO paper's run configs in their `runlocal` variants, end to end through `python -m dpo_jax.main`.

Each builds its whole pipeline on CPU: the controlled-sentiment experiment (the generated corpus,
pretraining, SFT, sampled pairs labelled by VADER, the reward model, DPO, PPO, PPO-GT, Preferred-FT,
Unlikelihood, Best-of-N and the results table and plot), IMDb's configuration of the same
pipeline, and TL;DR and HH (SFT, DPO, win rates at several temperatures).
"""

import json
import math
import os

import pytest
from conftest import SHARED_DATA, run_config, run_python, workdir_records

from dpo_jax.data import tokenize

pytestmark = pytest.mark.slow
HH_DIR = os.path.join(SHARED_DATA, "hh-rlhf")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _checkpoint_steps(workdir):
    """{run/stage: saved steps} of every run of an experiment workdir."""
    steps = {}
    for root, directories, _ in os.walk(os.path.join(workdir, "runs")):
        if os.path.basename(os.path.dirname(root)) == "checkpoints":
            steps[os.path.relpath(root, workdir)] = sorted(d for d in directories if d.isdigit())
    return steps


def test_sentiment_frontier_traces_every_method_over_seeds_and_resumes_without_redoing_work(tmp_path):
    workdir = str(tmp_path / "frontier")
    args = ["-m", "dpo_jax.main", "--config=configs/sentiment_frontier.py:runlocal", f"--workdir={workdir}"]
    first = run_python(args)

    rows = _read(os.path.join(workdir, "results.json"))  # each run's final point, and the baselines
    assert {row["method"] for row in rows} == {"SFT", "DPO", "IPO", "PPO", "PPO-GT", "Online DPO", "GRPO",
                                               "Preferred-FT", "Unlikelihood", "Best-of-N"}
    by_method = {row["method"]: row for row in rows}
    assert by_method["SFT"]["kl"] == 0.0  # the SFT model scored against itself: the same forward pass
    assert by_method["Best-of-N"]["kl"] == pytest.approx(math.log(2) - 1 / 2)  # N=2, the analytic bound
    assert all(math.isfinite(row["kl"]) and -1.0 <= row["score"] <= 1.0 for row in rows)  # VADER compound
    # DPO: 2 learning rates x 2 seeds (the runlocal's seeded method); IPO at each learning rate, one seed.
    assert sorted((row["setting"], row["seed"]) for row in rows if row["method"] == "DPO") == [
        ("beta=0.1 lr=0.001", 0), ("beta=0.1 lr=0.001", 1), ("beta=0.1 lr=0.003", 0), ("beta=0.1 lr=0.003", 1)]
    assert sorted(row["setting"] for row in rows if row["method"] == "IPO") == ["beta=0.1 lr=0.001",
                                                                                  "beta=0.1 lr=0.003"]
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        assert len([line for line in f if line.startswith("| ")]) == len(rows) + 1  # header + a row each
    with open(os.path.join(workdir, "frontier.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # Trajectories: every method run evaluated at steps 2 and 4 (experiment.trajectory_every=2), after the
    # SFT model's point; the evaluated checkpoints but the last deleted.
    trajectories = _read(os.path.join(workdir, "trajectories.json"))
    method_runs = [run for run in trajectories if run["method"] not in ("SFT", "Best-of-N")]
    assert len(method_runs) == len(rows) - 2
    sft_point = next(run for run in trajectories if run["method"] == "SFT")["points"][0]
    for run in method_runs:
        assert [point["step"] for point in run["points"]] == [0, 2, 4], run["name"]
        assert run["points"][0] == sft_point
        assert all(point["kl_standard_error"] > 0 for point in run["points"][1:]), run["name"]
        cached = _read(os.path.join(workdir, "runs", run["name"], "trajectory.json"))
        assert cached["points"] == run["points"][1:]
        stage = _read(os.path.join(workdir, "runs", run["name"], "config.json"))["stages"][0]
        # The evaluation's cost beside the training's: the run's own records, carried over as they are.
        assert run["eval_seconds"] == cached["eval_seconds"]
        summary = _read(os.path.join(workdir, "runs", run["name"], "summary.json"))
        assert run["train_seconds"] == summary[stage]["wall_seconds"]
        assert sorted(os.listdir(os.path.join(workdir, "runs", run["name"], "checkpoints", stage))) == ["4"]
    # The budget table: a row per method, each cell within [SFT's score, 1]; DPO's over its 2 seeds.
    table = {row["method"]: row for row in _read(os.path.join(workdir, "budgets.json"))}
    assert set(table) == {row["method"] for row in rows}
    assert table["DPO"]["seeds"] == [0, 1] and table["PPO"]["seeds"] == [0]
    for budget, cell in table["DPO"]["budgets"].items():
        assert len(cell["per_seed"]) == 2 and cell["interval"] is not None, budget
        assert all(sft_point["score"] <= value <= 1.0 for value in cell["per_seed"])
    with open(os.path.join(workdir, "budgets.md"), encoding="utf-8") as f:
        budgets_md = f.read()
    assert budgets_md.startswith("| method | seeds | KL ≤ 1 | KL ≤ 2 | KL ≤ 5 | KL ≤ 10 |")
    assert "| DPO | 2 | " in budgets_md and "Highest mean per budget: " in budgets_md

    # Pairs: every record chosen over rejected by the ground-truth score.
    with open(os.path.join(workdir, "pairs", "train.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    assert pairs and all(pair["chosen_score"] > pair["rejected_score"] for pair in pairs)
    # Each method ran from the SFT checkpoint in its own workdir, with its settings and seed.
    for seed in (0, 1):
        dpo = _read(os.path.join(workdir, "runs", f"dpo_beta0.1_lr0.003_seed{seed}", "config.json"))
        assert (dpo["seed"], dpo["dpo"]["learning_rate"], dpo["dpo"]["reference"]) == (seed, 0.003, "precomputed")
    assert set(_read(os.path.join(workdir, "runs", "dpo_beta0.1_lr0.001_seed0", "summary.json"))) == {"data", "dpo"}
    ppo = _read(os.path.join(workdir, "runs", "ppo_target_kl6", "config.json"))["ppo"]
    assert (ppo["adaptive_kl"], ppo["target_kl"]) == (True, 6.0)
    ppo_gt_config = _read(os.path.join(workdir, "runs", "ppo_gt_kl_coef0.05", "config.json"))
    assert ppo_gt_config["ppo"]["reward"] == "vader"
    ipo_config = _read(os.path.join(workdir, "runs", "ipo_beta0.1_lr0.001", "config.json"))
    assert ipo_config["dpo"]["loss_type"] == ["ipo"]
    for name, stage in (("online_dpo_beta0.1", "online_dpo"), ("grpo_beta0.04", "grpo")):
        run_config_ = _read(os.path.join(workdir, "runs", name, "config.json"))
        assert run_config_[stage]["reward_from"].endswith(os.path.join("runs", "reward", "checkpoints", "reward"))

    # A rerun finds everything done: the same table, no new checkpoint, the pairs not rewritten.
    steps_before = _checkpoint_steps(workdir)
    pairs_mtime = os.path.getmtime(os.path.join(workdir, "pairs", "train.jsonl"))
    second = run_python(args)
    assert second.stdout.splitlines()[-len(rows) - 1:] == first.stdout.splitlines()[-len(rows) - 1:]
    assert _checkpoint_steps(workdir) == steps_before
    assert os.path.getmtime(os.path.join(workdir, "pairs", "train.jsonl")) == pairs_mtime
    # A method added to the experiment runs alone: every other run, and the shared pieces, are kept.
    run_python(args + ["--config.experiment.grpo_betas=0.04,0"])
    steps_after = _checkpoint_steps(workdir)
    added = os.path.join("runs", "grpo_beta0", "")
    assert {key: value for key, value in steps_after.items() if not key.startswith(added)} == steps_before
    assert [run["setting"] for run in _read(os.path.join(workdir, "trajectories.json")) if run["method"] == "GRPO"] \
        == ["beta=0.04", "beta=0"]


def test_imdb_runlocal_builds_the_controlled_sentiment_pipeline(tmp_path):
    workdir = str(tmp_path / "imdb")
    run_python(["-m", "dpo_jax.main", "--config=configs/imdb_gpt2_large.py:runlocal", f"--workdir={workdir}"])
    rows = _read(os.path.join(workdir, "results.json"))
    assert {row["method"] for row in rows} == {"SFT", "DPO", "PPO", "Preferred-FT", "Best-of-N"}
    assert _read(os.path.join(workdir, "runs", "sft", "config.json"))["stages"] == ["sft"]
    ppo = next(run for run in _read(os.path.join(workdir, "trajectories.json")) if run["method"] == "PPO")
    assert ppo["setting"] == "target_kl=6" and [point["step"] for point in ppo["points"]] == [0, 2, 4]


def _train_tokenizer(texts, directory):
    return tokenize.train_byte_level_bpe(texts, directory, vocab_size=512)


def _assert_win_rates(workdir, temperatures):
    evaluation = _read(os.path.join(workdir, "summary.json"))["evaluation"]
    assert sorted(evaluation["temperatures"]) == sorted(temperatures)
    for result in evaluation["temperatures"].values():
        assert 0.0 <= result["win_rate"] <= 1.0
    assert math.isfinite(evaluation["kl"])
    rows = _read(os.path.join(workdir, "results.json"))  # one row per temperature
    assert [row["win_rate"] for row in rows] == [evaluation["temperatures"][t]["win_rate"] for t in temperatures]
    with open(os.path.join(workdir, "win_rates.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tldr_runlocal_reports_win_rates_at_each_temperature(tmp_path):
    manual = tmp_path / "tldr"
    posts = [dict(id=str(i), subreddit="cats", title=f"My cat number {i}",
                  post=f"My cat {i} sleeps all day and then runs around at night. Is that normal?")
             for i in range(40)]
    summaries = ["cat sleeps by day, runs at night", "a wonderful happy cat", "terrible awful night noise",
                 "the cat is fine", "sleepy cat"]
    comparisons = [{"info": post, "summaries": [{"text": summaries[i % 5]}, {"text": summaries[(i + 1) % 5]}],
                    "choice": i % 2, "split": "train" if i < 32 else "valid1"} for i, post in enumerate(posts)]
    os.makedirs(manual / "comparisons")
    os.makedirs(manual / "tldr_3_filtered")
    with open(manual / "comparisons" / "batch3.json", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c) + "\n" for c in comparisons)
    for split, part in (("train", posts[:32]), ("valid", posts[32:])):
        with open(manual / "tldr_3_filtered" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(post, summary=summaries[int(post["id"]) % 5])) + "\n" for post in part)
    texts = [f"SUBREDDIT: r/{p['subreddit']}\nTITLE: {p['title']}\nPOST: {p['post']}\nTL;DR: {s}"
             for p in posts for s in summaries]
    tokenizer_dir = _train_tokenizer(texts, str(tmp_path / "tokenizer"))
    workdir = str(tmp_path / "run")
    run_python(["-m", "dpo_jax.main", "--config=configs/tldr_gptj.py:runlocal", f"--workdir={workdir}",
                f"--config.data.manual_dir={manual}", f"--config.data.tokenizer={tokenizer_dir}",
                f"--config.data.data_dir={tmp_path / 'tfds'}"])
    summary = _read(os.path.join(workdir, "summary.json"))
    assert {"sft", "dpo", "evaluation"} <= set(summary)
    assert summary["dpo"]["steps"] == 4
    _assert_win_rates(workdir, ["0.0", "1.0"])


@pytest.mark.skipif(not os.path.isdir(HH_DIR), reason="needs the HH file of ../shared/data/hh-rlhf")
# grpo: samples of HH prompts decoded to text and scored by VADER on the host; online_dpo: each pair of
# samples labelled by a judge (VADER's scores compared).
@pytest.mark.parametrize("method, flags", [("dpo", []), ("grpo", []),
                                           ("online_dpo", ["--config.online_dpo.judge=scorer:vader"])])
def test_hh_runlocal_reports_win_rates_against_the_chosen_responses(tmp_path, method, flags):
    import gzip  # pylint: disable=import-outside-toplevel
    with gzip.open(os.path.join(HH_DIR, "harmless-base", "test.jsonl.gz"), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(500), f)]
    tokenizer_dir = _train_tokenizer(texts, str(tmp_path / "tokenizer"))
    workdir = str(tmp_path / "run")
    run_python(["-m", "dpo_jax.main", f"--config=configs/hh_pythia28b.py:runlocal,method={method}",
                f"--workdir={workdir}", f"--config.data.tokenizer={tokenizer_dir}",
                f"--config.data.data_dir={tmp_path / 'tfds'}", *flags])
    _assert_win_rates(workdir, ["1.0"])
    if method != "dpo":
        train = [r for r in workdir_records(workdir) if r["stage"] == method and r["split"] == "train"]
        assert [r["step"] for r in train] == [2, 4]
        if method == "grpo":
            assert all(-1.0 <= r["objective/scores"] <= 1.0 for r in train)  # VADER's compound score
        else:  # a judge's preference and its complement, per pair
            assert all(r["objective/scores"] == pytest.approx(0.5) for r in train)
            assert all(0.0 <= r["objective/scores_margin"] <= 1.0 for r in train)


@pytest.mark.parametrize("config_file", ["imdb_gpt2_large", "tldr_gptj", "hh_pythia28b", "sentiment_frontier"])
def test_full_configs_carry_the_papers_hyperparameters(config_file):
    config = run_config(config_file)
    if config_file != "sentiment_frontier":  # trained from scratch at a tiny scale instead
        assert (config.train.optimizer, config.dpo.learning_rate, config.dpo.warmup_steps,
                config.train.global_batch_size) == ("rmsprop", 1e-6, 150, 64)
    expected_beta = {"tldr_gptj": 0.5}.get(config_file, 0.1)
    assert config.dpo.beta == expected_beta
    if config_file == "imdb_gpt2_large":  # appendix C.1: SFT for one epoch of the 25,000 training reviews
        assert config.sft.num_steps * config.train.global_batch_size >= 25_000
        assert (config.sft.num_steps - 1) * config.train.global_batch_size < 25_000
        assert config.experiment.dpo_betas == (0.05, 0.1, 1.0, 5.0) and config.experiment.samples_per_prompt == 4
        # Section 6.1: PPO to target KLs 3, 6, 9, 12; each run evaluated every 100 steps.
        assert config.experiment.ppo_target_kls == (3.0, 6.0, 9.0, 12.0) and config.experiment.trajectory_every == 100
    if config_file == "sentiment_frontier":  # the paper's betas, 3 learning rates over a decade, 3 seeds
        experiment = config.experiment
        assert experiment.dpo_betas == (0.05, 0.1, 1.0, 5.0) and experiment.ppo_target_kls == (3.0, 6.0, 9.0, 12.0)
        assert max(experiment.dpo_learning_rates) / min(experiment.dpo_learning_rates) >= 10 - 1e-9
        assert experiment.num_seeds == 3 and set(experiment.seeded_methods) == {"dpo", "ppo", "online_dpo"}
        assert 50 <= experiment.trajectory_every <= 100
