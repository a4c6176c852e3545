"""`python -m dpo_jax.sample` and `python -m dpo_jax.evaluate` on finished runs: samples from a checkpoint or a
Hugging Face directory, greedy decoding against an independent one, the sample evaluation redone without
retraining (the numbers training gave, the run's files untouched), and one-line errors for bad inputs."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_config, run_python
from flax import nnx

from dpo_jax import checkpointing, evaluate, models, planning, restore, sample, sharding, train
from dpo_jax.data import synthetic, tokenize
from dpo_jax.workdir import write_config

WORDS = "the cat dog sat ran on a mat log fast slow happily sadly".split()
# A deterministic scorer: the length of the response's text.
LENGTH_SCORER = "import json, sys\nfor line in sys.stdin:\n    print(len(json.loads(line)['response']))\n"
TEXT_PROMPTS = ["\n\nHuman: the cat sat on a mat\n\nAssistant:", "\n\nHuman: a dog ran\n\nAssistant:",
                "\n\nHuman: slow\n\nAssistant:"]


def _pairs(num_pairs, seed):
    rng = np.random.default_rng(seed)
    text = lambda n: " " + " ".join(rng.choice(WORDS, size=n))
    return [{"prompt": "\n\nHuman:" + text(rng.integers(2, 8)) + "\n\nAssistant:", "chosen": text(rng.integers(1, 6)),
             "rejected": text(rng.integers(1, 6))} for _ in range(num_pairs)]


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return str(path)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run_with_stdin(args, stdin):
    """`python args...` from the repo root with `stdin` as its input; the CompletedProcess (it must succeed)."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The quickstart's tiny SFT + DPO on the synthetic task (token ids, no tokenizer)."""
    workdir = str(tmp_path_factory.mktemp("synthetic_run"))
    train.run(run_config("quickstart", "runlocal"), workdir)
    return workdir


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """SFT + DPO on preference files with a BPE tokenizer, ending with a sample evaluation: a length scorer,
    the judge built on it, at temperatures 0 and 1."""
    directory = tmp_path_factory.mktemp("text_run")
    train_file = _write_jsonl(directory / "train.jsonl", _pairs(60, 0))
    eval_file = _write_jsonl(directory / "test.jsonl", _pairs(20, 1))
    texts = [p["prompt"] + p["chosen"] + p["rejected"] for p in _pairs(60, 0)]
    tokenizer_dir = tokenize.train_byte_level_bpe(texts, str(directory / "tokenizer"), vocab_size=300)
    scorer_script = directory / "length.py"
    scorer_script.write_text(LENGTH_SCORER)
    scorer = f"command:{sys.executable} {scorer_script}"
    config = run_config("quickstart", "runlocal")
    config.model.vocab_size = 300
    config.data.update(name=("preference_files",), train_files=(train_file,), eval_files=(eval_file,),
                       tokenizer=tokenizer_dir, data_dir=str(directory / "tfds"), max_length=40, max_prompt_length=16)
    config.evaluation.update(scorer=scorer, judge=f"scorer:{scorer}", temperatures=(0.0, 1.0), num_prompts=8,
                             samples_per_prompt=2, max_new_tokens=8, batch_size=4)
    workdir = str(directory / "run")
    train.run(config, workdir)
    return workdir


def _snapshot(workdir):
    """{relative path: bytes} of every file of a workdir but its evaluations/, and its directories."""
    files = {}
    for root, directories, names in os.walk(workdir):
        relative = os.path.relpath(root, workdir)
        if relative.split(os.sep)[0] == "evaluations":
            continue
        files.update({os.path.join(relative, d) + "/": None for d in directories if d != "evaluations"})
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.join(relative, name)] = f.read()
    return files


def _restored_params(workdir, config, stage):
    """A stage's final decoder params read straight from its checkpoint (not through dpo_jax.restore)."""
    model = planning.plan_model(config, sharding.make_mesh(config.mesh))
    params = checkpointing.restore_params(os.path.join(workdir, "checkpoints", stage), model.abstract_params)
    return model.graphdef, params


def _greedy(graphdef, params, prompt_ids, max_new_tokens, eos_ids):
    """Greedy decoding by a full forward pass per token, the argmax of the last position's logits."""
    ids, response = list(prompt_ids), []
    for _ in range(max_new_tokens):
        logits = models.apply(graphdef, params, jnp.asarray([ids], jnp.int32))
        token = int(jnp.argmax(logits[0, -1]))
        response.append(token)
        ids.append(token)
        if token in eos_ids:
            break
    return response


# ---------------------------------------------------------------------------------------------
# python -m dpo_jax.sample
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_greedy_samples_of_a_synthetic_run_are_its_argmax_decoding(synthetic_run):
    config = run_config("quickstart", "runlocal")
    prompts = [(f"prompt {i}", {"prompt_ids": pair["prompt"]})
               for i, pair in enumerate(synthetic.make_pairs(4, seed=7, vocab_size=config.model.vocab_size))]
    sampler = sample.from_workdir(synthetic_run)
    assert sampler.tokenizer is None and sampler.eos_ids == (synthetic.EOS,)
    assert sampler.description.startswith("stage dpo of")  # the last policy stage
    records = sample.sample(sampler, prompts, temperature=0.0, max_new_tokens=10, batch_size=3)
    assert records == sample.sample(sampler, prompts, temperature=0.0, max_new_tokens=10, batch_size=1)
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(i, 0) for i in range(4)]
    graphdef, params = _restored_params(synthetic_run, config, "dpo")
    for (_, prompt), record in zip(prompts, records):
        assert record["prompt_ids"] == prompt["prompt_ids"]
        assert record["response_ids"] == _greedy(graphdef, params, prompt["prompt_ids"], 10, (synthetic.EOS,))
    # --stage picks another policy stage: the SFT model decodes differently from the DPO model.
    sft_records = sample.sample(sample.from_workdir(synthetic_run, stage="sft"), prompts, temperature=0.0,
                                max_new_tokens=10)
    graphdef, sft_params = _restored_params(synthetic_run, config, "sft")
    assert [r["response_ids"] for r in sft_records] == [
        _greedy(graphdef, sft_params, prompt["prompt_ids"], 10, (synthetic.EOS,)) for _, prompt in prompts]


@pytest.mark.slow
def test_sample_command_writes_num_samples_decoded_responses_per_prompt(text_run, tmp_path):
    prompts_file = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in TEXT_PROMPTS])
    out = tmp_path / "samples.jsonl"
    options = dict(temperature=1.0, top_k=20, top_p=0.95, max_new_tokens=8, num_samples=3, seed=3)
    run_python(["-m", "dpo_jax.sample", f"--workdir={text_run}", f"--prompts={prompts_file}", f"--out={out}",
                "--batch_size=2", *[f"--{key}={value}" for key, value in options.items()]])
    records = _read_jsonl(out)
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(i, k) for i in range(3) for k in range(3)]
    assert [r["prompt"] for r in records] == [text for text in TEXT_PROMPTS for _ in range(3)]
    assert all(isinstance(r["response"], str) for r in records) and any(r["response"] for r in records)
    # The command and the library draw the same samples for the seed, whatever the batch size; another
    # seed draws others.
    sampler = sample.from_workdir(text_run)
    prompts = sample.read_prompts(prompts_file)
    assert sample.sample(sampler, prompts, batch_size=1, **options) == records
    assert sample.sample(sampler, prompts, batch_size=1, **{**options, "seed": 4}) != records


@pytest.mark.slow
def test_greedy_text_responses_decode_the_argmax_tokens_and_repeat(text_run, tmp_path):
    config = restore.read_config(text_run)
    tokenizer = tokenize.load(config.data.tokenizer)
    prompts_file = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in TEXT_PROMPTS])
    args = ["-m", "dpo_jax.sample", f"--workdir={text_run}", f"--prompts={prompts_file}", "--temperature=0",
            "--max_new_tokens=8"]
    first = [json.loads(line) for line in run_python(args).stdout.splitlines()]
    second = [json.loads(line) for line in run_python(args + ["--batch_size=1"]).stdout.splitlines()]
    assert first == second and len(first) == len(TEXT_PROMPTS)
    graphdef, params = _restored_params(text_run, config, "dpo")
    eos_ids = tuple(tokenizer.eos_ids)
    for text, record in zip(TEXT_PROMPTS, first):
        response = _greedy(graphdef, params, tokenizer.encode(text, add_special_tokens=False), 8, eos_ids)
        assert record["response"] == tokenizer.decode(response[:-1] if response[-1] in eos_ids else response)


@pytest.mark.slow
def test_sample_from_a_hugging_face_directory_matches_the_checkpoint(text_run, tmp_path):
    config = restore.read_config(text_run)
    policy = restore.restore_policy(text_run, config, sharding.make_mesh(config.mesh))
    hf_dir = tmp_path / "hf"
    models.save_hf(nnx.merge(policy.model.graphdef, policy.params), str(hf_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the run's tokenizer, as export copies a checkpoint's
        shutil.copy(os.path.join(config.data.tokenizer, name), hf_dir / name)
    prompts = "".join(json.dumps({"prompt": text}) + "\n" for text in TEXT_PROMPTS)
    result = _run_with_stdin(["-m", "dpo_jax.sample", f"--hf_dir={hf_dir}", "--temperature=0", "--max_new_tokens=8",
                              "--num_samples=2"], prompts)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = sample.sample(sample.from_workdir(text_run), [("", {"prompt": text}) for text in TEXT_PROMPTS],
                             temperature=0.0, max_new_tokens=8, num_samples=2)
    assert len(records) == 2 * len(TEXT_PROMPTS) and records == expected


def test_a_reward_stage_is_not_a_policy(tmp_path):
    config = run_config("quickstart", "runlocal")
    config.stages = ("sft", "reward", "dpo")
    mesh = sharding.make_mesh(config.mesh)
    with pytest.raises(ValueError, match=r"stage 'reward': trains no policy \(it gives \['reward_model'\]\); the "
                                         r"run's policy stages are \['sft', 'dpo'\]"):
        restore.restore_policy(str(tmp_path), config, mesh, stage="reward")
    with pytest.raises(ValueError, match=r"checkpoints: holds no checkpoint of a policy stage"):
        restore.restore_policy(str(tmp_path), config, mesh)


# ---------------------------------------------------------------------------------------------
# python -m dpo_jax.evaluate
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_with_the_runs_options_gives_the_numbers_training_gave(text_run):
    before = _snapshot(text_run)
    result, out_dir = evaluate.evaluate(text_run)
    summary = _read_json(os.path.join(text_run, "summary.json"))
    assert result == summary["evaluation"]  # same programs, same inputs: exactly
    name = evaluate.default_name(restore.read_config(text_run).evaluation)
    assert out_dir == os.path.join(text_run, "evaluations", name)
    assert os.path.basename(out_dir).endswith("_t0.0,1.0_n8x2_len8")
    assert _read_json(os.path.join(out_dir, "results.json")) == _read_json(os.path.join(text_run, "results.json"))
    with open(os.path.join(out_dir, "win_rates.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    recorded = _read_json(os.path.join(out_dir, "evaluation.json"))
    assert recorded["result"] == result and recorded["policy_stage"] == "dpo" and recorded["seed"] == 0
    assert recorded["evaluation"]["temperatures"] == [0.0, 1.0]
    assert result["kl"] != 0.0 and np.isfinite(result["kl_standard_error"])  # the reference is the SFT model
    assert _snapshot(text_run) == before


@pytest.mark.slow
def test_evaluate_command_with_other_options_writes_beside_the_run_only(text_run):
    before = _snapshot(text_run)
    result = run_python(["-m", "dpo_jax.evaluate", f"--workdir={text_run}", "--scorer=vader", "--judge=",
                         "--temperatures=0.5,1.0", "--num_prompts=4", "--samples_per_prompt=1", "--max_new_tokens=6",
                         "--batch_size=2"])
    out_dir = os.path.join(text_run, "evaluations", "scorer-vader_t0.5,1.0_n4x1_len6")
    assert f"results in {out_dir}" in result.stdout and "KL to reference" in result.stdout
    rows = _read_json(os.path.join(out_dir, "results.json"))
    assert [row["temperature"] for row in rows] == [0.5, 1.0]
    assert all(row["num_samples"] == 4 and -1.0 <= row["score"] <= 1.0 and "win_rate" not in row for row in rows)
    recorded = _read_json(os.path.join(out_dir, "evaluation.json"))
    assert recorded["evaluation"] == dict(scorer="vader", judge="", temperatures=[0.5, 1.0], num_prompts=4,
                                          samples_per_prompt=1, max_new_tokens=6, batch_size=2)
    assert {"kl", "kl_standard_error"} <= set(recorded["result"]) and np.isfinite(recorded["result"]["kl"])
    assert all(row["kl"] == recorded["result"]["kl"] for row in rows)
    assert not os.path.exists(os.path.join(out_dir, "win_rates.png"))  # no judge
    assert _snapshot(text_run) == before
    # The same name with other options is refused, before anything is sampled.
    with pytest.raises(ValueError, match=r"holds an evaluation with other options \(num_prompts: 4 -> 3\)"):
        evaluate.evaluate(text_run, name="scorer-vader_t0.5,1.0_n4x1_len6", scorer="vader", judge="",
                          temperatures=["0.5", "1.0"], num_prompts=3, samples_per_prompt=1, max_new_tokens=6)


@pytest.mark.slow
def test_evaluate_refuses_a_synthetic_run_before_reading_its_checkpoints(synthetic_run):
    with pytest.raises(ValueError, match=r"the run has no tokenizer \(the synthetic task is token ids\)"):
        evaluate.evaluate(synthetic_run, scorer="vader")
    assert not os.path.exists(os.path.join(synthetic_run, "evaluations"))


def test_default_names_follow_the_options():
    config = run_config("quickstart", "runlocal")
    config.evaluation.update(scorer="vader", temperatures=(1.0,), num_prompts=64, samples_per_prompt=2,
                             max_new_tokens=24)
    assert evaluate.default_name(config.evaluation) == "scorer-vader_t1.0_n64x2_len24"
    config.evaluation.update(scorer="", judge="command:python /some/where/judge.py --model=" + "x" * 60)
    name = evaluate.default_name(config.evaluation)
    assert name.startswith("judge-command-python-some-where-judge.py") and "/" not in name and len(name) < 80
    config.evaluation.judge += "y"
    assert evaluate.default_name(config.evaluation) != name  # a long spec keeps a digest of all of it


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, naming the culprit, exit code 1
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_workdir(tmp_path_factory):
    """A workdir holding a run's config.json, but no checkpoint."""
    workdir = str(tmp_path_factory.mktemp("bare"))
    write_config(run_config("quickstart", "runlocal"), workdir)
    return workdir


@pytest.mark.parametrize("command, args, message", [
    ("evaluate", ["--workdir={missing}", "--scorer=vader"], "{missing}: no such directory"),
    ("evaluate", ["--workdir={bare}", "--scorer=vader"],
     "{bare}/checkpoints: holds no checkpoint of the stages ['sft', 'dpo'] (the run has not trained yet)"),
    ("evaluate", ["--workdir={bare}", "--scorer=bogus"], "config.evaluation.scorer: unknown scorer spec 'bogus'"),
    ("sample", ["--workdir={bare}", "--prompts={text_lines}"], "{text_lines}:1: not a JSON object"),
    ("sample", ["--workdir={bare}", "--prompts={prompts}"],
     "{bare}/checkpoints: holds no checkpoint of a policy stage"),
    ("sample", ["--prompts={prompts}"], "--workdir / --hf_dir: give one of them"),
])
def test_bad_inputs_fail_with_one_line_naming_the_culprit(bare_workdir, tmp_path, command, args, message):
    text_lines = tmp_path / "prompts.txt"
    text_lines.write_text("Tell me about cats.\n")
    paths = dict(missing=str(tmp_path / "missing"), bare=bare_workdir, text_lines=str(text_lines),
                 prompts=_write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_ids": [1, 8, 9, 3]}]))
    result = run_python(["-m", f"dpo_jax.{command}", *[arg.format(**paths) for arg in args]], check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]  # one line, the last
    assert errors[0].startswith(f"Error: {message.format(**paths)}"), errors[0]
    assert "Traceback" not in result.stderr
