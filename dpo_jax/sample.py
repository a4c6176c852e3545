r"""Samples from a run's policy, or from a Hugging Face checkpoint, with the KV-cache sampler.

  python -m dpo_jax.sample --workdir=/tmp/dpo_run --prompts=prompts.jsonl --out=samples.jsonl \
      [--stage=sft] [--temperature=0.7 --top_p=0.9 --top_k=50] [--num_samples=4] [--max_new_tokens=64]
  echo '{"prompt": "The movie was"}' | python -m dpo_jax.sample --hf_dir=/tmp/dpo_run/hf --temperature=0

The policy: the newest checkpoint of `--stage` of the run in `--workdir` (default: the last policy stage
of `config.stages` that saved one, as export picks it; the reward stage is no policy), or the Hugging
Face directory `--hf_dir` (`models.load_hf`, e.g. what `python -m dpo_jax.export` wrote).

Prompts are JSON lines (one object per line; blank lines are skipped) from `--prompts=FILE` (a path or
URL) or stdin (`--prompts=-`, the default), each one of
  {"prompt": "text"}              encoded as the training data's prompts are: no special tokens but the
                                  BOS of a tokenizer that puts one first (Llama), not truncated
  {"messages": [{"role": ..., "content": ...}, ...]}
                                  rendered by the tokenizer's chat template, with its generation prompt
  {"prompt_ids": [1, 17, ...]}    token ids, as they are
Plain text lines are refused (a line that is not a JSON object is an error naming it).

Output: JSON lines to `--out=FILE` or stdout, one per sample, prompt-major:
{"prompt_index": i, "sample": k, "prompt": text, "response": text}, the response decoded without the
end-of-sequence token that ended it (one of the tokenizer's `eos_ids`). The tokenizer is `--tokenizer`,
else the run's `data.tokenizer` or `model.init_from_hf` (with `--hf_dir`: the directory's own, when it
has a tokenizer.json). Without one (the synthetic task's runs are token ids) prompts must be
{"prompt_ids"} and records are {"prompt_index", "sample", "prompt_ids", "response_ids"}, the response's
ids with the EOS that ended it (the synthetic task's EOS, id 2; none for an --hf_dir without tokenizer).

Sample k of prompt i is drawn with key i * num_samples + k of `jax.random.split(key(seed), ...)`, as the
sample evaluation draws its samples (`evaluation.sample_responses`): the same seed gives the same samples
whatever `--batch_size`. `--temperature=0` is greedy decoding.
"""

import dataclasses
import json
import sys
from typing import Any, Optional

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from dpo_jax import checkpointing, commands, evaluation, models, restore, sharding, storage
from dpo_jax.data import synthetic, tokenize

FLAGS = flags.FLAGS

PROMPT_KEYS = ("prompt", "messages", "prompt_ids")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A policy to sample from: its graph and params, its architecture, tokenizer and end-of-sequence ids."""
    graphdef: Any
    params: Any
    decoder_config: models.DecoderConfig
    tokenizer: Optional[models.Tokenizer]  # None: prompts and responses are token ids
    eos_ids: tuple
    description: str


def from_workdir(workdir, *, stage=None, tokenizer=None):
    """The `Sampler` of a policy stage's newest checkpoint (`restore.restore_policy`)."""
    config = restore.read_config(workdir)
    # The parameters split over the local devices (FSDP), as export reads them.
    mesh = sharding.make_mesh({**{axis: 1 for axis in config.mesh}, "fsdp": -1}, devices=jax.local_devices())
    policy = restore.restore_policy(workdir, config, mesh, stage=stage)
    path = tokenizer or config.data.tokenizer or config.model.init_from_hf
    loaded = tokenize.load(path) if path else None
    if loaded is not None:
        eos_ids = tuple(loaded.eos_ids)
    else:
        eos_ids = (synthetic.EOS,) if "synthetic" in config.data.name else ()
    return Sampler(policy.model.graphdef, policy.params, models.decoder_config(config.model), loaded, eos_ids,
                   f"stage {policy.stage} of {workdir}")


def from_hf_dir(hf_dir, *, dtype="float32", tokenizer=None):
    """The `Sampler` of a Hugging Face checkpoint directory (`models.load_hf`)."""
    if not storage.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    if not storage.isfile(storage.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir}: not a Hugging Face checkpoint directory (it has no config.json)")
    model = models.load_hf(hf_dir, dtype=dtype)
    graphdef, state = nnx.split(model, nnx.Param)
    path = tokenizer or (hf_dir if storage.isfile(storage.join(hf_dir, "tokenizer.json")) else None)
    loaded = tokenize.load(path) if path else None
    return Sampler(graphdef, nnx.to_pure_dict(state), model.config, loaded,
                   tuple(loaded.eos_ids) if loaded is not None else (), hf_dir)


def read_prompts(path, stream=None):
    """[(location, record)] of a JSON lines file (`-`: `stream`, default stdin), blank lines skipped."""
    if path == "-":
        source, text = "<stdin>", (stream or sys.stdin).read()
    else:
        if not storage.isfile(path):
            raise FileNotFoundError(f"--prompts={path}: no such file")
        source, text = path, storage.read_text(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        location = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{location}: not a JSON object ({error.msg}); prompts are JSON lines of "
                             '{"prompt": ...}, {"messages": [...]} or {"prompt_ids": [...]}') from None
        if not isinstance(record, dict):
            raise ValueError(f"{location}: not a JSON object but a {type(record).__name__}")
        keys = [key for key in PROMPT_KEYS if key in record]
        if len(keys) != 1:
            raise ValueError(f"{location}: needs exactly one of {', '.join(PROMPT_KEYS)}; it has {sorted(record)}")
        prompts.append((location, record))
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return prompts


def _prompt_ids(record, location, tokenizer):
    """(token ids, text; None for token ids) of one prompt record."""
    if "prompt_ids" in record:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{location}: prompt_ids must be a list of integers")
        return ids, None
    if tokenizer is None:
        raise ValueError(f"{location}: a text prompt, but there is no tokenizer to encode it (the run or --hf_dir has "
                         'none, as the synthetic task\'s runs): give --tokenizer, or token ids {"prompt_ids": [...]}')
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f'{location}: messages must be a list of {{"role": str, "content": str}}')
        if not tokenizer.chat_template:
            raise ValueError(f"{location}: chat messages, but the tokenizer in {tokenizer.path} has no chat template")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a template's own errors (jinja2) name no location
            raise ValueError(f"{location}: the chat template fails on these messages ({error})") from None
    else:
        text = record["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"{location}: prompt must be a string")
    # A plain prompt is text from data: its special tokens' text stays text, as in training.
    ids = (tokenizer.encode(text, add_special_tokens=False) if "messages" in record
           else tokenizer.encode_text([text])[0])
    bos_id = tokenize.added_bos(tokenizer)
    if bos_id is not None and ids[:1] != [bos_id]:  # as `tokenize.tokenize` encodes the training prompts
        ids = [bos_id] + ids
    return ids, text


def encode_prompts(prompts, sampler, max_new_tokens):
    """(prompt_ids [n, width] right-padded, prompt_lengths [n], texts or None) of `read_prompts`' records."""
    config = sampler.decoder_config
    encoded, texts = [], []
    for location, record in prompts:
        ids, text = _prompt_ids(record, location, sampler.tokenizer)
        if not ids:
            raise ValueError(f"{location}: an empty prompt (the first token needs one before it)")
        if min(ids) < 0 or max(ids) >= config.vocab_size:
            raise ValueError(f"{location}: token id {max(ids) if max(ids) >= 0 else min(ids)} is outside the "
                             f"model's vocabulary of {config.vocab_size}")
        if config.position_embedding == "learned" and len(ids) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(f"{location}: {len(ids)} prompt tokens plus --max_new_tokens={max_new_tokens} exceed the "
                             f"model's max_position_embeddings={config.max_position_embeddings}")
        encoded.append(ids)
        texts.append(text if text is not None or sampler.tokenizer is None else sampler.tokenizer.decode(ids))
    prompt_ids = np.zeros((len(encoded), max(len(ids) for ids in encoded)), np.int32)
    for row, ids in enumerate(encoded):
        prompt_ids[row, :len(ids)] = ids
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    return prompt_ids, lengths, texts if sampler.tokenizer is not None else None


def _check_options(*, temperature, top_k, top_p, max_new_tokens, num_samples, batch_size):
    checks = [("temperature", temperature, temperature >= 0, ">= 0"), ("top_k", top_k, top_k >= 0, ">= 0"),
              ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
              ("max_new_tokens", max_new_tokens, max_new_tokens > 0, "> 0"),
              ("num_samples", num_samples, num_samples > 0, "> 0"), ("batch_size", batch_size, batch_size > 0, "> 0")]
    for name, value, good, requirement in checks:
        if not good:
            raise ValueError(f"--{name}={value}: must be {requirement}")


def sample(sampler, prompts, *, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64, num_samples=1, batch_size=8,
           seed=0):
    """The sample records of `read_prompts`' prompts (module docstring), prompt-major."""
    _check_options(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                   num_samples=num_samples, batch_size=batch_size)
    prompt_ids, prompt_lengths, texts = encode_prompts(prompts, sampler, max_new_tokens)
    samples = evaluation.sample_responses(
        sampler.graphdef, sampler.params, prompt_ids, prompt_lengths, rng=jax.random.key(seed),
        temperature=temperature, top_k=top_k, top_p=top_p, samples_per_prompt=num_samples,
        max_new_tokens=max_new_tokens, eos_ids=sampler.eos_ids, pad_id=0, batch_size=batch_size)
    end_ids = set(sampler.eos_ids)
    records = []
    for index in range(len(prompts)):
        for k in range(num_samples):
            ids = samples.tokens[index, k, :samples.lengths[index, k]].tolist()
            record = {"prompt_index": index, "sample": k}
            if texts is None:
                record.update(prompt_ids=prompt_ids[index, :prompt_lengths[index]].tolist(), response_ids=ids)
            else:
                text_ids = ids[:-1] if ids and ids[-1] in end_ids else ids
                record.update(prompt=texts[index], response=sampler.tokenizer.decode(text_ids))
            records.append(record)
    return records


def define_flags():
    """The command's flags, defined when it runs (not on import: other modules define --workdir too)."""
    flags.DEFINE_string("workdir", None, "Run directory to sample from (holds config.json and checkpoints/).")
    flags.DEFINE_string("stage", None, "With --workdir: the policy stage whose newest checkpoint to sample "
                        "(default: the last policy stage that saved one).")
    flags.DEFINE_string("hf_dir", None, "A Hugging Face checkpoint directory to sample from instead of --workdir.")
    flags.DEFINE_string("dtype", "float32", "With --hf_dir: the compute and parameter dtype.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory or tokenizer.json (default: the run's "
                        "data.tokenizer or model.init_from_hf; with --hf_dir the directory's own).")
    flags.DEFINE_string("prompts", "-", "JSON lines of {\"prompt\"}, {\"messages\"} or {\"prompt_ids\"}; - is stdin.")
    flags.DEFINE_string("out", None, "JSON lines file to write the samples to (default: stdout).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens holding this mass (1.0: all).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per sample at most (the EOS included).")
    flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
    flags.DEFINE_integer("batch_size", 8, "Prompts per sampling batch (each with its --num_samples samples).")
    flags.DEFINE_integer("seed", 0, "Seed of the samples' random keys.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpointing.quiet_orbax_logs()
    if bool(FLAGS.workdir) == bool(FLAGS.hf_dir):
        sys.exit("Error: --workdir / --hf_dir: give one of them (a run's directory or a Hugging Face checkpoint)")
    try:
        if FLAGS.hf_dir and FLAGS.stage:
            raise ValueError(f"--stage={FLAGS.stage}: picks a stage of a --workdir run, not of --hf_dir")
        prompts = read_prompts(FLAGS.prompts)
        _check_options(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       max_new_tokens=FLAGS.max_new_tokens, num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size)
        if FLAGS.workdir:
            sampler = from_workdir(FLAGS.workdir, stage=FLAGS.stage, tokenizer=FLAGS.tokenizer)
        else:
            sampler = from_hf_dir(FLAGS.hf_dir, dtype=FLAGS.dtype, tokenizer=FLAGS.tokenizer)
        logging.info("Sampling %d prompts x %d from %s", len(prompts), FLAGS.num_samples, sampler.description)
        records = sample(sampler, prompts, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                         max_new_tokens=FLAGS.max_new_tokens, num_samples=FLAGS.num_samples,
                         batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as error:
        sys.exit(f"Error: {error}")
    if FLAGS.out:
        storage.write_jsonl(FLAGS.out, records)
        logging.info("Wrote %d samples to %s", len(records), FLAGS.out)
    else:
        sys.stdout.writelines(json.dumps(record) + "\n" for record in records)


def run():
    """`python -m dpo_jax.sample`."""
    define_flags()
    commands.run(main, __name__)


if __name__ == "__main__":
    run()
