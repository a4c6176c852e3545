"""Sample-based evaluation of policies, as in the DPO paper: sample on held-out prompts, score the samples.

    result = evaluate_policy(graphdef, params, reference_params, prompt_ids, prompt_lengths,
                             decode=tokenizer.decode, scorer=scorers.make_scorer("vader"),
                             temperatures=(0.0, 0.25, 0.5, 0.75, 1.0), samples_per_prompt=4,
                             max_new_tokens=64, eos_ids=tokenizer.eos_ids, pad_id=0, seed=0, batch_size=64,
                             judge=judge, reference_responses=chosen_texts)
    rows = evaluation_rows("DPO beta=0.1", result)
    write_results(rows, out_dir); plot_frontier(rows, out_dir + "/frontier.png")

    # A run's `config.evaluation`, as training ends with it and `python -m dpo_jax.evaluate` reruns it:
    evaluate_run(config, task, graphdef, policy_params, reference_params, method="dpo", out_dir=workdir,
                 scorer=scorer, judge=judge)

- Controlled sentiment (IMDb): the reward-KL frontier: mean score of samples at temperature 1 against
  the sequence KL(pi || pi_ref), estimated from the same samples.
- Summarisation (TL;DR) and dialogue (HH): win rates of samples against reference responses under a
  judge, at several temperatures.
- Best-of-N: N samples per prompt, the one a learned reward ranks highest kept (`best_of_n`).

Sample j of prompt i is drawn with key i * samples_per_prompt + j of `jax.random.split(key(seed), ...)`,
whatever the policy, temperature or batch size (`sampling.generate` draws each sequence from its own
key): policies evaluated with the same seed see common random numbers, so their differences are not
the noise of different draws.
"""

import functools
import math
import os
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from dpo_jax import losses, metrics, models, storage
from dpo_jax.models import sampling


def map_batches(fn, inputs, batch_size, *, description=None):
    """`fn(*batch)` over `inputs` (arrays sharing a leading axis) in batches of `batch_size` rows, the
    outputs (a pytree of arrays with that leading axis) concatenated.

    The last batch is padded by repeating its final row, and the padding's outputs dropped, so every
    batch has one shape and `fn` compiles once. `description`: show a progress bar over the batches
    when there is more than one.
    """
    total = len(inputs[0])
    if not total:
        raise ValueError("map_batches got no rows")
    batch_size = max(1, min(batch_size, total))
    num_batches = -(-total // batch_size)
    bar = metrics.progress_bar(description, 0, num_batches) if description and num_batches > 1 else None
    outputs = []
    for start in range(0, total, batch_size):
        batch = [np.asarray(x[start:start + batch_size]) for x in inputs]
        real = len(batch[0])
        batch = [np.concatenate([x, np.repeat(x[-1:], batch_size - real, axis=0)]) for x in batch]
        outputs.append(jax.tree.map(lambda y, real=real: np.asarray(y)[:real], fn(*batch)))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


# ---------------------------------------------------------------------------------------------
# Sampling and sequence log-probs
# ---------------------------------------------------------------------------------------------

class Samples(NamedTuple):
    tokens: np.ndarray   # [prompts, samples_per_prompt, max_new_tokens] int32; pad_id after the end
    lengths: np.ndarray  # [prompts, samples_per_prompt] int32: tokens generated, the EOS included
    logps: np.ndarray    # [prompts, samples_per_prompt] float32: log pi(y | x) at temperature 1, summed over
                         # the response, whatever temperature drew it

    @property
    def responses(self):
        """The token ids of every response (EOS included), prompt-major: sample j of prompt i at
        i * samples_per_prompt + j."""
        return [[int(token) for token in tokens[:length]]
                for tokens, length in zip(self.tokens.reshape(-1, self.tokens.shape[-1]), self.lengths.ravel())]


def sample_responses(graphdef, params, prompt_ids, prompt_lengths, *, rng, temperature, samples_per_prompt,
                     max_new_tokens, eos_ids, pad_id, batch_size, top_k=0, top_p=1.0):
    """`samples_per_prompt` responses to each prompt, by `sampling.generate`: `Samples`.

    prompt_ids: [prompts, width] right-padded; prompt_lengths: [prompts]. rng: one key; sample j of
    prompt i uses key i * samples_per_prompt + j of its split, so the samples depend on the key only
    (not on `batch_size` or the policy's other samples). batch_size: prompts per `generate` call.
    top_k, top_p: `sampling.generate`'s truncation (0 and 1.0: off).
    """
    prompt_ids, prompt_lengths = np.asarray(prompt_ids), np.asarray(prompt_lengths)
    num_prompts = len(prompt_ids)
    keys = jax.random.key_data(jax.random.split(rng, num_prompts * samples_per_prompt))

    def generate(batch_prompts, batch_lengths, batch_keys):
        return sampling.generate(graphdef, params, batch_prompts, batch_lengths,
                                 rng=jax.random.wrap_key_data(batch_keys), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id)

    generation = map_batches(
        generate, (np.repeat(prompt_ids, samples_per_prompt, axis=0),
                   np.repeat(prompt_lengths, samples_per_prompt, axis=0), np.asarray(keys)),
        batch_size * samples_per_prompt, description=f"sampling at temperature {temperature}")
    shape = (num_prompts, samples_per_prompt)
    return Samples(tokens=generation.tokens.reshape(*shape, -1), lengths=generation.lengths.reshape(shape),
                   logps=generation.logps.sum(axis=-1).reshape(shape))


def _prompt_plus_response(prompt_ids, prompt_lengths, response_ids, response_lengths, pad_id):
    """Rows [n, prompt width + response width] of each prompt followed by its response, right-padded,
    with their segment ids (1 on tokens) and the mask of the response's tokens."""
    prompt_width, response_width = prompt_ids.shape[1], response_ids.shape[1]
    columns = np.arange(prompt_width + response_width)[None, :]
    prompt_ends = prompt_lengths[:, None]
    sequence_ends = prompt_ends + response_lengths[:, None]
    prompt_part = np.pad(prompt_ids, ((0, 0), (0, response_width)))
    response_part = np.take_along_axis(response_ids, np.clip(columns - prompt_ends, 0, response_width - 1), axis=1)
    input_ids = np.where(columns < prompt_ends, prompt_part, np.where(columns < sequence_ends, response_part, pad_id))
    response_mask = (columns >= prompt_ends) & (columns < sequence_ends)
    return input_ids.astype(np.int32), (columns < sequence_ends).astype(np.int32), response_mask.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora"))
def _response_logps(graphdef, params, input_ids, segment_ids, response_mask, use_lora):
    # Position t predicts token t + 1: the last position predicts nothing, the first token is never predicted.
    logits = models.apply(graphdef, params, input_ids[:, :-1], segment_ids=segment_ids[:, :-1], use_lora=use_lora)
    return losses.sequence_logps(logits, input_ids[:, 1:], response_mask[:, 1:])


def sequence_logps(graphdef, params, prompt_ids, prompt_lengths, response_ids, response_lengths, batch_size, *,
                   pad_id=0, use_lora=True):
    """log p(response | prompt) summed over the response's tokens, [n] float32, by a forward pass of the
    model over prompt + response (e.g. the reference's log-probs of a policy's samples).

    prompt_ids: [n, width] right-padded, prompt_lengths: [n]; response_ids: [n, response width],
    response_lengths: [n] (tokens of each response scored, its EOS included). batch_size: rows per
    forward pass. use_lora=False: the model with its LoRA adapters off (the reference of LoRA-DPO).
    """
    inputs = _prompt_plus_response(np.asarray(prompt_ids), np.asarray(prompt_lengths), np.asarray(response_ids),
                                   np.asarray(response_lengths), pad_id)
    return map_batches(functools.partial(_response_logps, graphdef, params, use_lora=use_lora), inputs, batch_size)


def sequence_kl(policy_logps, reference_logps):
    """(estimate, standard error) of KL(pi || pi_ref) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)], from the
    summed log-probs of samples y drawn from the policy at temperature 1 (any other temperature
    estimates something else)."""
    log_ratios = np.asarray(policy_logps, np.float64).ravel() - np.asarray(reference_logps, np.float64).ravel()
    standard_error = log_ratios.std(ddof=1) / math.sqrt(log_ratios.size) if log_ratios.size > 1 else math.nan
    return float(log_ratios.mean()), float(standard_error)


def best_of_n_kl(n):
    """KL(best-of-n || pi) <= log n - (n - 1) / n, the analytic value used for Best-of-N (Stiennon et al.
    2020; tight for continuous rewards without ties, Hilton 2023)."""
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------------------------------
# Evaluations
# ---------------------------------------------------------------------------------------------

def _response_texts(samples, decode, eos_ids):
    """[prompts][samples] texts of the responses, a final EOS token not part of the text."""
    end_ids = set(eos_ids)
    texts = [decode(ids[:-1] if ids and ids[-1] in end_ids else ids) for ids in samples.responses]
    samples_per_prompt = samples.lengths.shape[1]
    return [texts[start:start + samples_per_prompt] for start in range(0, len(texts), samples_per_prompt)]


def _score_responses(prompt_texts, response_texts, response_lengths, *, scorer, judge, reference_responses):
    """Score statistics of [prompts][k] responses: mean, std, win rate against the reference responses."""
    samples_per_prompt = len(response_texts[0])
    prompts = [prompt for prompt in prompt_texts for _ in range(samples_per_prompt)]
    responses = [text for texts in response_texts for text in texts]
    result = {"response_length": float(np.mean(response_lengths)), "num_samples": len(responses)}
    if scorer is not None:
        scores = np.asarray(scorer(prompts, responses), np.float64)
        result.update(score=float(scores.mean()), score_std=float(scores.std()))
    if judge is not None and reference_responses is not None:
        references = [reference for reference in reference_responses for _ in range(samples_per_prompt)]
        result["win_rate"] = float(np.mean(judge(prompts, responses, references)))
    return result


def _prompt_texts(prompt_ids, prompt_lengths, decode):
    return [decode([int(token) for token in ids[:length]]) for ids, length in zip(prompt_ids, prompt_lengths)]


def evaluate_policy(graphdef, params, reference_params, prompt_ids, prompt_lengths, *, decode, scorer, temperatures,
                    samples_per_prompt, max_new_tokens, eos_ids, pad_id, seed, batch_size, judge=None,
                    reference_responses=None):
    """Samples responses at each temperature and scores them; estimates KL(pi || pi_ref).

    decode: token ids -> text (e.g. `tokenizer.decode`); scorer: (prompts, responses) -> scores
    (`scorers.make_scorer`; None: no scores, e.g. for win rates only); judge and reference_responses
    (one text per prompt): win rates, the mean of judge(prompt, sample, reference). reference_params:
    the reference model's params for the same `graphdef` (None: no KL).

    Returns {"temperatures": {str(float(temperature)): {"score", "score_std", "response_length" (mean
    tokens, EOS included), "num_samples"[, "win_rate"]}}, "kl", "kl_standard_error"}: the KL from
    samples at temperature 1, those of the evaluation when 1.0 is among `temperatures`, else drawn
    for it. Temperatures are string keys ("1.0"), as they read back from JSON.
    """
    prompt_ids, prompt_lengths = np.asarray(prompt_ids), np.asarray(prompt_lengths)
    prompt_texts = _prompt_texts(prompt_ids, prompt_lengths, decode)
    draw = functools.partial(sample_responses, graphdef, params, prompt_ids, prompt_lengths, rng=jax.random.key(seed),
                             samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                             pad_id=pad_id, batch_size=batch_size)
    result = {"temperatures": {}}
    unit_temperature_samples = None
    for temperature in temperatures:
        samples = draw(temperature=temperature)
        if temperature == 1.0:
            unit_temperature_samples = samples
        result["temperatures"][str(float(temperature))] = _score_responses(
            prompt_texts, _response_texts(samples, decode, eos_ids), samples.lengths, scorer=scorer, judge=judge,
            reference_responses=reference_responses)
    if reference_params is not None:
        samples = unit_temperature_samples if unit_temperature_samples is not None else draw(temperature=1.0)
        # Both log-probs by the same forward pass rather than the policy's from the KV-cache decode, so
        # that numerical differences between the two paths (larger in bfloat16) do not bias the estimate,
        # and a policy equal to its reference gives exactly 0.
        args = (np.repeat(prompt_ids, samples_per_prompt, axis=0), np.repeat(prompt_lengths, samples_per_prompt),
                samples.tokens.reshape(-1, max_new_tokens), samples.lengths.ravel(), batch_size * samples_per_prompt)
        result["kl"], result["kl_standard_error"] = sequence_kl(
            sequence_logps(graphdef, params, *args, pad_id=pad_id),
            sequence_logps(graphdef, reference_params, *args, pad_id=pad_id))
    return result


def evaluate_run(config, task, graphdef, policy_params, reference_params, *, method, out_dir, scorer, judge):
    """A run's sample evaluation, `config.evaluation`: the one that ends training (`train.py`) and the one
    `python -m dpo_jax.evaluate` runs on a finished run, so that the two cannot differ.

    `evaluate_policy` of the policy on the first `evaluation.num_prompts` held-out prompts of `task`
    (`task.prompts_eval`), decoded by `task.tokenizer`, with the KL to `reference_params` (None: no KL)
    and, with a judge, win rates against the prompts' reference (chosen) responses; sampled with
    `config.seed`. scorer, judge: built from `config.evaluation.scorer` / `judge` (`scorers.make_scorer`,
    `make_judge`; None when unset). Process 0 writes results.json and results.md (`evaluation_rows`
    labelled `method`) and, with a judge, win_rates.png into `out_dir`. Returns the result.
    """
    tokenizer = task.tokenizer
    if tokenizer is None:
        raise ValueError("config.evaluation: sample evaluation scores the texts of responses, but this run has no "
                         "tokenizer (the synthetic task is token ids; config.data.tokenizer is empty)")
    evaluation_config = config.evaluation
    prompts = {key: value[:evaluation_config.num_prompts] for key, value in task.prompts_eval.items()}
    result = evaluate_policy(
        graphdef, policy_params, reference_params, prompts["prompt_ids"], prompts["prompt_lengths"],
        decode=tokenizer.decode, scorer=scorer, temperatures=list(evaluation_config.temperatures),
        samples_per_prompt=evaluation_config.samples_per_prompt, max_new_tokens=evaluation_config.max_new_tokens,
        eos_ids=tuple(tokenizer.eos_ids), pad_id=0, seed=config.seed, batch_size=evaluation_config.batch_size,
        judge=judge, reference_responses=[tokenizer.decode(ids[:length].tolist()) for ids, length in
                                          zip(prompts["reference_ids"], prompts["reference_lengths"])])
    logging.info("sample evaluation: %s", result)
    if jax.process_index() == 0:  # results.json / results.md, and with a judge win_rates.png
        rows = evaluation_rows(method, result)
        write_results(rows, out_dir)
        if judge is not None:
            plot_win_rates(rows, storage.join(out_dir, "win_rates.png"))
    return result


def best_of_n(graphdef, params, prompt_ids, prompt_lengths, *, n, decode, reward_scorer, scorer, max_new_tokens,
              eos_ids, pad_id, seed, batch_size, temperature=1.0, judge=None, reference_responses=None):
    """The Best-of-N baseline: `n` samples per prompt from the policy (the SFT model), the one
    `reward_scorer` (a learned reward) ranks highest kept and scored by `scorer` (the ground truth).

    Returns the statistics of `evaluate_policy` for the kept responses, "kl": `best_of_n_kl(n)`, "n",
    and "responses" (the kept texts, one per prompt).
    """
    prompt_ids, prompt_lengths = np.asarray(prompt_ids), np.asarray(prompt_lengths)
    prompt_texts = _prompt_texts(prompt_ids, prompt_lengths, decode)
    samples = sample_responses(graphdef, params, prompt_ids, prompt_lengths, rng=jax.random.key(seed),
                               temperature=temperature, samples_per_prompt=n, max_new_tokens=max_new_tokens,
                               eos_ids=eos_ids, pad_id=pad_id, batch_size=batch_size)
    texts = _response_texts(samples, decode, eos_ids)
    rewards = np.asarray(reward_scorer([prompt for prompt in prompt_texts for _ in range(n)],
                                       [text for samples_texts in texts for text in samples_texts])).reshape(-1, n)
    best = np.argmax(rewards, axis=1)
    best_texts = [[prompt_samples[index]] for prompt_samples, index in zip(texts, best)]
    best_lengths = np.take_along_axis(samples.lengths, best[:, None], axis=1)
    result = _score_responses(prompt_texts, best_texts, best_lengths, scorer=scorer, judge=judge,
                              reference_responses=reference_responses)
    return {**result, "kl": best_of_n_kl(n), "n": n, "responses": [texts[0] for texts in best_texts]}


# ---------------------------------------------------------------------------------------------
# Results: table, JSON, plots
# ---------------------------------------------------------------------------------------------

def evaluation_rows(method, evaluation, **fields):
    """Result rows of an `evaluate_policy` result, one per temperature: {"method", "setting",
    "temperature", "kl", "score", ...}, plus `fields` (e.g. beta=0.1) in every row."""
    return [{"method": method, "setting": f"T={float(temperature):g}", "temperature": float(temperature),
             "kl": evaluation.get("kl"), **stats, **fields}
            for temperature, stats in evaluation["temperatures"].items()]


_LEADING_COLUMNS = ("method", "setting", "kl", "score", "win_rate")


def _table_cell(value):
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _json_value(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_results(rows, out_dir):
    """Writes `results.json` (the rows) and `results.md` (a Markdown table, one line per row, of
    the scalar fields, the leading columns first) into `out_dir`; returns their paths."""
    json_path, markdown_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    storage.write_json(json_path, rows, only_process_zero=False, sort_keys=False, default=_json_value)
    columns = [column for column in _LEADING_COLUMNS if any(column in row for row in rows)]
    for row in rows:
        columns += [key for key, value in row.items()
                    if key not in columns and isinstance(value, (str, int, float, np.number, type(None)))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_table_cell(row.get(column)) for column in columns) + " |" for row in rows]
    storage.write_text(markdown_path, "\n".join(lines) + "\n", only_process_zero=False)
    return json_path, markdown_path


def figure(size=(6, 4.5)):
    """A matplotlib Figure and its axes, apart from pyplot."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Plots need matplotlib: pip install 'dpo_jax[repro]'") from error
    # A bare Figure renders PNGs with Agg and leaves pyplot's global backend and state alone.
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def _plot_by_method(rows, path, x_key, y_key, *, x_label, y_label, title, chance_level=None):
    fig, axes = figure()
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        points = sorted((row[x_key], row[y_key]) for row in rows
                        if row["method"] == method and row.get(x_key) is not None and row.get(y_key) is not None)
        if points:
            axes.plot(*zip(*points), marker="o", label=method)
    if chance_level is not None:
        axes.axhline(chance_level, color="gray", linestyle="--", linewidth=1)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    storage.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=150), only_process_zero=False)
    return path


def plot_frontier(rows, path):
    """The reward-KL frontier (PNG): mean score against KL(pi || pi_ref), one line per method."""
    return _plot_by_method(rows, path, "kl", "score", x_label=r"KL($\pi \,\|\, \pi_\mathrm{ref}$) per sequence (nats)",
                           y_label="mean reward", title="Reward vs KL to the reference")


def plot_win_rates(rows, path):
    """Win rates against the reference responses by sampling temperature (PNG), one line per method."""
    return _plot_by_method(rows, path, "temperature", "win_rate", x_label="sampling temperature",
                           y_label="win rate vs reference responses", title="Win rate by temperature",
                           chance_level=0.5)
