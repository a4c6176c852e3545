"""The kto stage: unpaired examples from users' files or split pairs, the KTO loss in the shared step, a run
that learns."""

import functools
import json
import re

import jax
import numpy as np
import pytest
from conftest import workdir_records

from dpo_jax import losses, models, steps, train
from dpo_jax.configs import validation
from dpo_jax.data import loader, records, tokenize, unpaired
from dpo_jax.data.task import load_task

WORDS = "the cat dog sat ran on a mat log fast slow happily sadly".split()
# Each turn ends with the tokenizer's EOS, which ends a rendered response.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _records(count, seed):
    rng = np.random.default_rng(seed)
    text = lambda n: " " + " ".join(rng.choice(WORDS, size=n))
    rows = []
    for i in range(count):
        if i % 3 == 2:  # TRL's conversational form
            rows.append({"prompt": [{"role": "user", "content": text(4).strip()}],
                         "completion": [{"role": "assistant", "content": text(3).strip()}], "label": False})
        else:
            rows.append({"prompt": "Q:" + text(rng.integers(2, 8)) + "\nA:", "completion": text(rng.integers(1, 6)),
                         "label": bool(i % 2)})
    return rows


@pytest.fixture
def files_config(tiny_config, tmp_path):
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    for path, rows in ((train_path, _records(30, 0)), (eval_path, _records(12, 1))):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = [(r["prompt"] if isinstance(r["prompt"], str) else "") + str(r["completion"]) for r in _records(30, 0)]
    config = tiny_config
    config.model.vocab_size = 300
    config.stages = ("kto",)
    tokenizer_dir = tokenize.train_byte_level_bpe(texts, str(tmp_path / "tokenizer"), vocab_size=300)
    (tmp_path / "tokenizer" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config.data.update(tokenizer=tokenizer_dir, max_length=32, max_prompt_length=16)
    config.kto.update(train_files=(str(train_path),), eval_files=(str(eval_path),))
    return config


@pytest.mark.parametrize("record, error", [
    ({"prompt": "p", "completion": "c"}, "missing field: 'label'"),
    ({"prompt": "p", "completion": "c", "label": 1}, "wrong type: 'label' must be true (desirable) or false"),
    ({"prompt": "p", "label": True}, "missing field: 'completion'"),
    ({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "user", "content": "c"}], "label": True},
     "wrong type: 'completion' must end with an assistant message"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}], "label": True},
     "wrong type: 'prompt' must be a list of {'role', 'content'} messages"),
    ({"prompt": "p", "completion": "   ", "label": False}, "empty response"),
    (["p", "c", True], "wrong type: a record must be a JSON object"),
])
def test_a_bad_unpaired_record_is_named_with_its_location(record, error):
    with pytest.raises(records.BadExample, match="^" + re.escape("f.jsonl:7: " + error)):
        unpaired.unpaired_example(record, "f.jsonl:7")


def test_unpaired_files_become_rows_with_labels_and_mismatched_completions(files_config):
    validation.validate(files_config)
    task = load_task(files_config)
    arrays = task.unpaired_train
    expected = [row["label"] for row in _records(30, 0)]
    np.testing.assert_array_equal(arrays["desirable"], np.array(expected, np.int32))
    assert task.report["unpaired kto.train_files"]["desirable"] == sum(expected)
    assert task.unpaired_eval["input_ids"].shape == (12, 32)
    # Each KL row is its row's prompt with another row's completion.
    prompt_tokens = lambda ids, mask: ids[:np.argmax(mask)] if mask.any() else ids
    completion = lambda ids, mask: tuple(ids[mask.astype(bool)])
    completions = [completion(i, m) for i, m in zip(arrays["input_ids"], arrays["loss_mask"])]
    for row in range(len(expected)):
        ids, mask = arrays["input_ids"][row], arrays["loss_mask"][row]
        kl_ids, kl_mask = arrays["kl_input_ids"][row], arrays["kl_loss_mask"][row]
        np.testing.assert_array_equal(prompt_tokens(kl_ids, kl_mask), prompt_tokens(ids, mask))
        kl_completion = completion(kl_ids, kl_mask)
        assert kl_completion in completions and any(
            c == kl_completion for j, c in enumerate(completions) if j != row)


def test_without_files_the_pairs_are_split_into_a_desirable_and_an_undesirable_example(tiny_config):
    tiny_config.stages = ("dpo", "kto")
    validation.validate(tiny_config)
    task = load_task(tiny_config)
    pairs, examples = task.pairs_train, task.unpaired_train
    assert len(examples["desirable"]) == 2 * len(pairs["chosen_input_ids"])
    np.testing.assert_array_equal(examples["desirable"], np.tile([1, 0], len(pairs["chosen_input_ids"])))
    np.testing.assert_array_equal(examples["input_ids"][0::2], pairs["chosen_input_ids"])
    np.testing.assert_array_equal(examples["input_ids"][1::2], pairs["rejected_input_ids"])


def test_the_step_loss_is_kto_of_the_rows_log_probs(tiny_config):
    tiny_config.stages = ("kto",)
    validation.validate(tiny_config)
    batch = loader.train_batches(load_task(tiny_config).unpaired_train, global_batch_size=8, seed=0)[0]
    graphdef, _, _ = models.abstract_model(tiny_config.model)
    params = models.init_params(tiny_config.model, seed=0, shardings=None)
    reference = models.init_params(tiny_config.model, seed=1, shardings=None)

    def sequence_logps(p, prefix=""):
        logits = models.apply(graphdef, p, batch[prefix + "input_ids"], segment_ids=batch[prefix + "segment_ids"])
        return losses.sequence_logps(logits[:, :-1], batch[prefix + "input_ids"][:, 1:],
                                     batch[prefix + "loss_mask"][:, 1:])

    kto = tiny_config.kto
    expected, expected_metrics = losses.kto_loss(
        sequence_logps(params), sequence_logps(reference), batch["desirable"], sequence_logps(params, "kl_"),
        sequence_logps(reference, "kl_"), beta=kto.beta, desirable_weight=kto.desirable_weight,
        undesirable_weight=kto.undesirable_weight)
    loss, (metrics, weight) = jax.jit(functools.partial(steps.kto_loss, graphdef=graphdef, kto_config=kto))(
        params, reference, batch, None)
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
    assert float(weight) == 8
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change, error", [
    (dict(layout="packed"), "config.data.layout: the kto stage reads padded rows"),
    (dict(tokenizer=""), "config.data.tokenizer: kto.train_files hold text"),
])
def test_bad_kto_configs_name_the_key(files_config, change, error):
    files_config.data.update(change)
    with pytest.raises(ValueError, match=error):
        validation.validate(files_config)


def test_kto_files_go_in_pairs(files_config):
    files_config.kto.eval_files = ()
    with pytest.raises(ValueError, match="config.kto.eval_files: kto.train_files and kto.eval_files go together"):
        validation.validate(files_config)


@pytest.mark.slow
def test_sft_then_kto_learns_the_preferred_mood(tiny_config, tmp_path):
    """On the synthetic task, KTO from the SFT model separates held-out chosen from rejected responses."""
    config = tiny_config
    config.stages = ("sft", "kto")
    config.kto.update(num_steps=40, learning_rate=3e-3, beta=1.0, warmup_steps=2)
    config.eval.every_steps = 20
    summary = train.run(config, str(tmp_path))
    evals = [r for r in workdir_records(str(tmp_path)) if r["stage"] == "kto" and r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 20, 40]
    before, after = evals[0], evals[-1]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "kl"} <= set(after)
    assert before["rewards/margins"] == 0.0  # the policy starts as its reference
    assert after["rewards/margins"] > 0.3 and after["loss"] < before["loss"] - 0.03, after
    assert summary["kto"]["steps"] == 40 and summary["kto"]["eval"] == {
        k: v for k, v in after.items() if k not in ("stage", "split", "step")}


def test_a_run_whose_data_fails_claims_no_workdir(files_config, tmp_path):
    """config.json is written once the data is ready: the corrected command then runs in the same workdir."""
    path = files_config.kto.train_files[0]
    good = open(path, encoding="utf-8").read()
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "p", "completion": "c", "label": "yes"}) + "\n")
    workdir = tmp_path / "run"
    files_config.kto.update(num_steps=1)
    files_config.eval.batch_size = 4  # 12 held-out examples
    with pytest.raises(records.BadExample, match=r"train.jsonl:31: wrong type: 'label' must be true"):
        train.run(files_config, str(workdir))
    assert not (workdir / "config.json").exists()
    with open(path, "w", encoding="utf-8") as f:
        f.write(good)
    files_config.kto.beta = 0.2  # a different config than the failed run's: still this workdir's run
    assert train.run(files_config, str(workdir))["kto"]["steps"] == 1
    assert json.loads((workdir / "config.json").read_text())["kto"]["beta"] == 0.2
