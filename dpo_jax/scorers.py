r"""Scorers of sampled responses and judges of response pairs, built from config strings.

A scorer maps texts to one number each, a judge compares two responses to the same prompt:

    scorer = make_scorer("vader")
    scorer(prompts, responses)              # np.ndarray float32 [n]
    judge = make_judge("scorer:vader")
    judge(prompts, responses_a, responses_b)  # float32 [n]: P(a is better than b), in [0, 1]

Scorer specs (`config.evaluation.scorer`, `config.ppo.reward`):
  vader                              VADER's compound sentiment of the response alone, in [-1, 1]
                                     (lexicon-based, on PyPI: the stand-in for the paper's IMDb classifier)
  command:<shell command>            any program: one JSON object {"prompt", "response"} per line on its
                                     stdin, one number per line on its stdout, in order
  hf_classifier:<model dir>[@label]  a Hugging Face sequence classifier (transformers + torch, CPU or GPU):
                                     the probability of `label` (default: the label named positive, else
                                     the last) given the response, e.g. siebert/sentiment-roberta-large-english
  reward_model:<dir>                 a reward model trained by this codebase's `reward` stage: a workdir or
                                     its checkpoints/reward directory (`RewardModelScorer.from_workdir`)
Judge specs (`config.evaluation.judge`):
  command:<shell command>            one JSON object {"prompt", "a", "b"} per line in, P(a better) per line out
  scorer:<scorer spec>               a is better when it scores higher; a tie counts 1/2

    python -m dpo_jax.scorers --hf_classifier=DIR[@label]   # JSONL on stdin -> scores on stdout

is a `command:` scorer, so a classifier can run in another environment (say, one with a GPU build of
torch) than the JAX run that calls it. That is also why only numpy and the standard library are
imported at the top: JAX, transformers and torch are imported by the scorers that need them.
"""

import argparse
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np

SCORER_KINDS = ("vader", "command:<shell command>", "hf_classifier:<model dir>[@label]", "reward_model:<dir>")
JUDGE_KINDS = ("command:<shell command>", "scorer:<scorer spec>")
_STDERR_TAIL_CHARS = 2000


class ScorerError(RuntimeError):
    """An external scorer or judge failed or answered something other than one number per input."""


def _check_same_length(prompts, *response_lists):
    for responses in response_lists:
        if len(responses) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses")


# ---------------------------------------------------------------------------------------------
# External commands
# ---------------------------------------------------------------------------------------------

def run_jsonl_command(command, records, *, what="scorer"):
    """Runs the shell `command` once with `records` as JSON lines on its stdin; returns the float64 [n]
    it prints, one number per line. Every failure raises ScorerError naming the command."""
    if not records:
        return np.zeros(0, np.float64)
    payload = "".join(json.dumps(record) + "\n" for record in records)
    result = subprocess.run(command, shell=True, input=payload, capture_output=True, text=True, encoding="utf-8",
                            check=False)
    if result.returncode != 0:
        raise ScorerError(f"The {what} command `{command}` exited with code {result.returncode}; "
                          f"its stderr ends:\n{result.stderr[-_STDERR_TAIL_CHARS:]}")
    lines = result.stdout.splitlines()
    if len(lines) != len(records):
        raise ScorerError(f"The {what} command `{command}` printed {len(lines)} lines for {len(records)} inputs "
                          "(expected one number per input line)")
    values = np.zeros(len(lines), np.float64)
    for index, line in enumerate(lines):
        try:
            values[index] = float(line)
        except ValueError:
            values[index] = math.nan
        if not math.isfinite(values[index]):
            raise ScorerError(f"The {what} command `{command}` printed {line!r} on output line {index + 1}, "
                              "not a finite number")
    return values


def command_scorer(command):
    """A scorer that runs `command` (see the module docstring) once per call."""

    def score(prompts, responses):
        _check_same_length(prompts, responses)
        records = [{"prompt": prompt, "response": response} for prompt, response in zip(prompts, responses)]
        return run_jsonl_command(command, records, what="scorer").astype(np.float32)

    return score


# ---------------------------------------------------------------------------------------------
# VADER
# ---------------------------------------------------------------------------------------------

def vader_scorer():
    """VADER's compound sentiment score of each response, in [-1, 1]; the prompt is not scored."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ImportError("The vader scorer needs the vaderSentiment package: pip install 'dpo_jax[repro]'") from error
    analyzer = SentimentIntensityAnalyzer()

    def score(prompts, responses):
        _check_same_length(prompts, responses)
        return np.array([analyzer.polarity_scores(response)["compound"] for response in responses], np.float32)

    return score


# ---------------------------------------------------------------------------------------------
# Hugging Face sequence classifiers
# ---------------------------------------------------------------------------------------------

def _label_index(id2label, label, model_dir):
    """The class index of `label` (a name, any case, or an index); by default the one named positive, else the last."""
    names = [str(id2label[i]) for i in range(len(id2label))]
    if label is None:
        positive = [i for i, name in enumerate(names) if name.lower() == "positive"]
        return positive[0] if positive else len(names) - 1
    matches = [i for i, name in enumerate(names) if name.lower() == label.lower()]
    if matches:
        return matches[0]
    if label.isdigit() and int(label) < len(names):
        return int(label)
    raise ValueError(f"The classifier in {model_dir} has no label {label!r}; its labels are {names}")


class HFClassifierScorer:
    """P(label | response) under a Hugging Face sequence classifier, run with transformers and torch."""

    def __init__(self, model_dir, label=None, *, batch_size=32, device=None):
        try:
            import torch
            import transformers
        except ImportError as error:
            raise ImportError("The hf_classifier scorer needs transformers and torch: pip install 'dpo_jax[parity]'") \
                from error
        from dpo_jax import storage
        model_dir = storage.local_copy(model_dir)  # transformers reads local directories
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        if self.tokenizer.pad_token is None:  # GPT-2 style tokenizers: any id pads, the attention mask hides it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # decoder classifiers find each text's last token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = _label_index(self.model.config.id2label, label, model_dir)
        # Texts longer than the model's positions are truncated; tokenizers saved without a limit report a huge one.
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(limit for limit in limits if limit)

    def __call__(self, prompts, responses):
        _check_same_length(prompts, responses)
        torch = self._torch
        probabilities = []
        with torch.inference_mode():
            for start in range(0, len(responses), self.batch_size):
                inputs = self.tokenizer(list(responses[start:start + self.batch_size]), padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**inputs).logits.float()
                probabilities.append(torch.softmax(logits, dim=-1)[:, self.label_index].cpu().numpy())
        return np.concatenate(probabilities).astype(np.float32) if probabilities else np.zeros(0, np.float32)


def _split_label(argument):
    """`<model dir>[@label]` -> (model dir, label or None); a directory whose name holds an @ stays whole."""
    from dpo_jax import storage

    model_dir, separator, label = argument.rpartition("@")
    if not separator or storage.isdir(argument) or not label or os.sep in label:
        return argument, None
    return model_dir, label


# ---------------------------------------------------------------------------------------------
# Reward models trained by this codebase
# ---------------------------------------------------------------------------------------------

class RewardModelScorer:
    """The reward of prompt + response under a scalar-head model of the `reward` stage.

    Texts are tokenised as the training data was (`dpo_jax.data.tokenize`: a BOS if the tokenizer
    adds one, the response ended by EOS) and truncated the same way (the prompt's end and the
    response's start kept, within `max_length` / `max_prompt_length`), and the score is the head's
    output at the last token, the position the Bradley-Terry loss trains.
    """

    def __init__(self, graphdef, params, tokenizer, *, max_length, batch_size=64, max_prompt_length=None):
        """graphdef, params: the ScalarModel's (params {"decoder", "head"}); tokenizer: a `dpo_jax.models.Tokenizer`."""
        import jax

        from dpo_jax import models
        from dpo_jax.models.scalar import last_token_scores

        self.params, self.tokenizer = params, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.max_prompt_length = max_length if max_prompt_length is None else max_prompt_length

        def last_token_rewards(params, input_ids, segment_ids):
            scores = models.apply_scalar(graphdef, params, input_ids, segment_ids=segment_ids)
            # A padded row holds one sequence: segment 1 is sequence slot 0, padding (segment 0) no slot.
            return last_token_scores(scores, segment_ids - 1, 1)[:, 0]

        self._last_token_rewards = jax.jit(last_token_rewards)

    @classmethod
    def from_workdir(cls, path, *, batch_size=64, mesh=None):
        """The newest reward checkpoint of a run; `path` is its workdir or its `checkpoints/reward`
        directory. The model, tokenizer and lengths come from the run's config.json. `mesh`: shard
        the parameters over it (default: replicated on every device)."""
        import ml_collections

        from dpo_jax import checkpointing, planning, sharding, storage
        from dpo_jax.data import tokenize

        path = storage.absolute(path)
        if storage.isfile(os.path.join(path, "config.json")):
            workdir, checkpoint_dir = path, os.path.join(path, "checkpoints", "reward")
        else:
            workdir, checkpoint_dir = os.path.dirname(os.path.dirname(path)), path
        config_path = os.path.join(workdir, "config.json")
        if not storage.isfile(config_path):
            raise FileNotFoundError(f"reward_model:{path}: expected a dpo_jax workdir (with config.json) or its "
                                    f"checkpoints/reward directory, but {config_path} does not exist")
        config = ml_collections.ConfigDict(storage.read_json(config_path))
        tokenizer_path = config.data.tokenizer or config.model.init_from_hf
        if not tokenizer_path:
            raise ValueError(f"The run in {workdir} has no tokenizer (data.tokenizer and model.init_from_hf are "
                             "empty, as in the synthetic task): build RewardModelScorer(graphdef, params, tokenizer, "
                             "...) with one")
        if mesh is None:  # the parameters replicated on every device
            mesh = sharding.make_mesh(dict(dcn=1, data=-1, fsdp=1, tensor=1))
        plan = planning.plan_model(config, mesh, scalar_head=True)
        params = checkpointing.restore_params(checkpoint_dir, plan.abstract_params)
        return cls(plan.graphdef, params, tokenize.load(tokenizer_path), max_length=config.data.max_length,
                   max_prompt_length=config.data.max_prompt_length, batch_size=batch_size)

    def _token_rows(self, prompts, responses):
        """Padded rows {input_ids, segment_ids} [n, max_length] of prompt + response, as in training."""
        from dpo_jax.data import layouts, records, tokenize

        examples = [dict(prompt=prompt, chosen=response, rejected="", prompt_messages=[], source=f"sample {index}")
                    for index, (prompt, response) in enumerate(zip(prompts, responses))]
        tokenized = tokenize.tokenize(examples, self.tokenizer, bad=records.BadExamples("error"),
                                      check_boundaries=False, need_rejected=False)
        keep_bos = int(tokenized.bos_id is not None)
        kept = [layouts.truncate(prompt, responses[0], max_length=self.max_length,
                                 max_prompt_length=self.max_prompt_length, keep_prefix=keep_bos)
                for prompt, responses in zip(tokenized.prompts, tokenized.responses)]
        rows, _ = layouts.padded_rows([prompt for prompt, _ in kept], [response for _, response in kept],
                                      max_length=self.max_length, max_prompt_length=self.max_length)
        return rows

    def __call__(self, prompts, responses):
        from dpo_jax import evaluation

        _check_same_length(prompts, responses)
        if not prompts:
            return np.zeros(0, np.float32)
        rows = self._token_rows(prompts, responses)
        rewards = evaluation.map_batches(functools.partial(self._last_token_rewards, self.params),
                                         (rows["input_ids"], rows["segment_ids"]), self.batch_size)
        return rewards.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------

# The packages a kind of scorer imports when it is built, and the extra of setup.py that installs them.
_REQUIREMENTS = {"vader": (("vaderSentiment",), "repro"), "hf_classifier": (("transformers", "torch"), "parity")}


def check_spec(spec, key, *, judge=False):
    """Raises ValueError naming `config.<key>` if a scorer (or `judge`) spec is unknown or needs a package
    that is not installed, so that a run fails before it trains rather than when it evaluates."""
    kind, _, argument = spec.partition(":")
    kind_names = lambda kinds: {known.partition(":")[0] for known in kinds}
    if judge:
        if kind not in kind_names(JUDGE_KINDS) or not argument:
            raise ValueError(f"config.{key}: unknown judge spec {spec!r}; known kinds: {', '.join(JUDGE_KINDS)}")
        if kind == "command":
            return
        spec, (kind, _, argument) = argument, argument.partition(":")
    if not (spec == "vader" or (kind in kind_names(SCORER_KINDS) - {"vader"} and argument)):
        raise ValueError(f"config.{key}: unknown scorer spec {spec!r}; known kinds: {', '.join(SCORER_KINDS)}")
    modules, extra = _REQUIREMENTS.get("vader" if spec == "vader" else kind, ((), ""))
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"config.{key}={spec!r} needs {' and '.join(missing)}, which is not installed: "
                         f"pip install 'dpo_jax[{extra}]'")


def make_scorer(spec, *, mesh=None):
    """The scorer of a spec string (module docstring); `mesh` places a reward model's parameters."""
    kind, _, argument = spec.partition(":")
    if spec == "vader":
        return vader_scorer()
    if kind == "command" and argument:
        return command_scorer(argument)
    if kind == "hf_classifier" and argument:
        model_dir, label = _split_label(argument)
        return HFClassifierScorer(model_dir, label)
    if kind == "reward_model" and argument:
        return RewardModelScorer.from_workdir(argument, mesh=mesh)
    raise ValueError(f"Unknown scorer spec {spec!r}; known kinds: {', '.join(SCORER_KINDS)}")


def scorer_judge(scorer):
    """A judge from a scorer: P(a better than b) is 1 when a scores higher, 0 when lower, 1/2 on a tie."""

    def judge(prompts, responses_a, responses_b):
        _check_same_length(prompts, responses_a, responses_b)
        scores_a, scores_b = scorer(prompts, responses_a), scorer(prompts, responses_b)
        return np.where(scores_a > scores_b, 1.0, np.where(scores_a < scores_b, 0.0, 0.5)).astype(np.float32)

    return judge


def command_judge(command):
    """A judge that runs `command`: {"prompt", "a", "b"} per line in, P(a better than b) per line out."""

    def judge(prompts, responses_a, responses_b):
        _check_same_length(prompts, responses_a, responses_b)
        records = [{"prompt": prompt, "a": a, "b": b} for prompt, a, b in zip(prompts, responses_a, responses_b)]
        probabilities = run_jsonl_command(command, records, what="judge")
        outside = np.flatnonzero((probabilities < 0) | (probabilities > 1))
        if outside.size:
            raise ScorerError(f"The judge command `{command}` printed {probabilities[outside[0]]} on output line "
                              f"{outside[0] + 1}: a probability must be in [0, 1]")
        return probabilities.astype(np.float32)

    return judge


def make_judge(spec, *, mesh=None):
    """The judge of a spec string: `command:<cmd>` or `scorer:<scorer spec>`."""
    kind, _, argument = spec.partition(":")
    if kind == "command" and argument:
        return command_judge(argument)
    if kind == "scorer" and argument:
        return scorer_judge(make_scorer(argument, mesh=mesh))
    raise ValueError(f"Unknown judge spec {spec!r}; known kinds: {', '.join(JUDGE_KINDS)}")


# ---------------------------------------------------------------------------------------------
# Command line: a classifier as a `command:` scorer
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m dpo_jax.scorers",
        description="Scores JSON lines {\"prompt\", \"response\"} from stdin, one number per line on stdout "
                    "(a `command:` scorer).")
    parser.add_argument("--hf_classifier", required=True, metavar="DIR[@LABEL]",
                        help="Hugging Face sequence classifier directory, optionally @ the label to score")
    parser.add_argument("--batch_size", type=int, default=32, help="texts per forward pass")
    args = parser.parse_args(argv)
    model_dir, label = _split_label(args.hf_classifier)
    scorer = HFClassifierScorer(model_dir, label, batch_size=args.batch_size)
    records = [json.loads(line) for line in sys.stdin if line.strip()]
    scores = scorer([record["prompt"] for record in records], [record["response"] for record in records])
    sys.stdout.write("".join(f"{float(score)!r}\n" for score in scores))


if __name__ == "__main__":
    main()
