"""Examples -> token ids with exact prompt/response boundaries.

The model sees `prompt_ids + response_ids`, where each part is encoded on its own (so the prompt's
ids are the same for both responses, and what is scored is exactly the response's ids):
  - text from data is encoded as text: the text of a special token in it (e.g. '<|endoftext|>' in a
    prompt) becomes ordinary tokens, never that token; special token ids come from the code alone
    (BOS, EOS) and from the chat template's own markup;
  - BOS once: prepended to the prompt when the tokenizer's own post-processor would add one (Llama,
    Gemma; not GPT-2), unless the prompt already starts with it (a chat template that renders it);
  - EOS once: appended to each response unless it already ends with an end-of-generation token (a
    chat template's end of turn); one inside a response is an error (it would end generation there);
  - only what truncation can keep is encoded (`max_length`, `max_prompt_length`): a longer text is
    cut first, so the work is bounded by the kept tokens whatever the length of the data;
  - the boundary check (`check_boundaries`, on by default; it costs one more encode per response)
    asserts that `prompt_ids + response_ids` is also how the tokenizer encodes the text
    prompt + response as a whole, i.e. no token would span the boundary and no space is added or
    lost at it; an example that fails is reported with its source file and line.
Chat examples (`prompt_messages`) are rendered with the checkpoint's Jinja chat template: the
prompt with the generation prompt, the response as what the template adds for the final assistant
message, ending at its end-of-turn token. Pad ids never matter: masks come from lengths.
"""

import dataclasses
import json
import os
import re
from typing import List, Optional, Sequence

import numpy as np
import tokenizers
from absl import logging

from dpo_jax import models, storage
from dpo_jax.data import records


@dataclasses.dataclass
class Tokenized:
    """Token ids of a split: per example the prompt and one (SFT) or two (chosen, rejected) responses."""
    prompts: List[List[int]]
    responses: List[List[List[int]]]  # [example][0: chosen, 1: rejected]
    sources: List[str]
    bos_id: Optional[int]  # the prompt's first token when the tokenizer adds a BOS (kept by truncation)


def load(path):
    """The tokenizer of `path`: a Hugging Face model directory, or its tokenizer.json."""
    if storage.isfile(path):
        if os.path.basename(path) != "tokenizer.json":
            raise ValueError(f"config.data.tokenizer={path!r}: expected a model directory or its tokenizer.json")
        path = os.fspath(storage.as_path(path).parent) if storage.is_remote(path) else os.path.dirname(path) or "."
    tokenizer = models.load_tokenizer(path)
    if tokenizer.token_id(tokenizer.eos_token) is None:
        raise ValueError(f"The tokenizer in {path} defines no eos_token (tokenizer_config.json), "
                         "so responses cannot be ended")
    return tokenizer


def train_byte_level_bpe(texts, output_dir, *, vocab_size=8192, eos_token="<|endoftext|>"):
    """Trains a GPT-2-style byte-level BPE on `texts` and saves it as a model directory (deterministic).

    `eos_token` is its one special token (as GPT-2: end of text, no BOS). Returns the directory,
    which `load` and `config.data.tokenizer` accept.
    """
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": eos_token, "bos_token": eos_token, "model_max_length": 1 << 20}, f)
    return output_dir


def added_bos(tokenizer):
    """The BOS id the tokenizer's post-processor puts before a text, or None (GPT-2 style)."""
    with_specials = tokenizer.tokenizer.encode("", add_special_tokens=True).ids
    bos_id = tokenizer.bos_id
    return bos_id if bos_id is not None and with_specials[:1] == [bos_id] else None


# Text longer than what can be kept is cut before it is encoded, so that the work is bounded by the
# tokens kept, not by the data (a 50 MB line makes a 32-token prompt quickly). A window of
# (tokens kept + _MARGIN_TOKENS) * _CHARS_PER_TOKEN characters is kept (a prompt's end, a response's
# start), cut at a whitespace so that no word is split; English averages about 4 characters a token.
# Tokens beside the cut may differ from the whole text's, so a window must give _MARGIN_TOKENS more
# tokens than are kept, or it is widened (x4) until it does or holds the whole text.
_CHARS_PER_TOKEN = 16
_MARGIN_TOKENS = 32
_WHITESPACE = re.compile(r"\s")
_WHITESPACE_SEARCH = 1024  # characters searched for a whitespace to cut at


@dataclasses.dataclass(frozen=True)
class _Text:
    """A text to encode. `data_spans` None: all of it is data (`Tokenizer.encode_text`); else a chat
    rendering, with the (start, stop) character spans of message contents that hold a special token's
    text (`Tokenizer.encode_rendered`; () when none does)."""
    text: str
    data_spans: Optional[tuple] = None

    def cut(self, start, stop):
        if self.data_spans is None:
            return _Text(self.text[start:stop])
        return _Text(self.text[start:stop], tuple((max(a, start) - start, min(b, stop) - start)
                                                  for a, b in self.data_spans if a < stop and b > start))

    def __add__(self, other):
        if self.data_spans is None and other.data_spans is None:
            return _Text(self.text + other.text)
        shift = len(self.text)
        return _Text(self.text + other.text, tuple(self.data_spans or ()) + tuple(
            (a + shift, b + shift) for a, b in other.data_spans or ()))


def _encode(tokenizer, texts):
    """Token ids of `_Text`s: data as text, renderings with their special tokens."""
    ids = [None] * len(texts)
    data = [i for i, text in enumerate(texts) if text.data_spans is None]
    rendered = [i for i, text in enumerate(texts) if text.data_spans is not None]
    for i, encoded in zip(data, tokenizer.encode_text([texts[i].text for i in data])):
        ids[i] = encoded
    for i, encoded in zip(rendered, tokenizer.encode_rendered([texts[i].text for i in rendered],
                                                              [texts[i].data_spans for i in rendered])):
        ids[i] = encoded
    return ids


def _window(text, tokens, keep_end, scale):
    """(`text` cut to a window that holds its last (keep_end) or first `tokens` tokens, whether it was cut)."""
    size = (tokens + _MARGIN_TOKENS) * _CHARS_PER_TOKEN * scale
    length = len(text.text)
    if length <= size:
        return text, False
    if keep_end:  # start at a whitespace (byte-level BPE joins a space to the word after it)
        start = length - size
        space = _WHITESPACE.search(text.text, start, start + _WHITESPACE_SEARCH)
        return text.cut(space.start() if space else start, length), True
    stop = next((i for i in range(size, max(size - _WHITESPACE_SEARCH, 0), -1) if text.text[i].isspace()), size)
    return text.cut(0, stop), True


def _encode_kept(tokenizer, texts, tokens, keep_end):
    """(windows, their ids) of `_Text`s of which the last (keep_end) or first `tokens` tokens can be
    kept (None: all): for text with whitespace those tokens are the whole text's."""
    if tokens is None:
        return list(texts), _encode(tokenizer, texts)
    windows, ids, todo, scale = list(texts), [None] * len(texts), range(len(texts)), 1
    while todo:
        cut = {}
        for i in todo:
            windows[i], cut[i] = _window(texts[i], tokens, keep_end, scale)
        for i, encoded in zip(todo, _encode(tokenizer, [windows[i] for i in todo])):
            ids[i] = encoded
        todo = [i for i in todo if cut[i] and len(ids[i]) < tokens + _MARGIN_TOKENS]
        scale *= 4
    return windows, ids


def _data_spans(tokenizer, rendering, contents, location):
    """The spans of `rendering` (a chat template's) that hold those `contents` with a special token's text."""
    pattern = tokenizer.special_pattern
    if pattern is None or not any(pattern.search(content) for content in contents):
        return ()
    spans, cursor = [], 0
    for content in contents:
        special = pattern.search(content)
        start = rendering.find(content, cursor) if content else -1
        if start < 0 and special:  # a template that trims the content
            content = content.strip()
            start = rendering.find(content, cursor)
        if start < 0:
            if special:
                raise records.BadExample(location, "special token in a message", (
                    f"a message holds the text {special.group()!r}, which is encoded as text, but the chat "
                    "template changes that message, so its text cannot be told from the template's tokens"))
            continue
        if special:
            spans.append((start, start + len(content)))
        cursor = start + len(content)
    return tuple(spans)


def _render_chat(tokenizer, messages, response, location):
    """(prompt, response) `_Text`s of a chat example: the response is what the template adds for it."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}])
    if not full.startswith(prompt):
        raise records.BadExample(location, "chat template boundary",
                                 "the rendering with the response does not start with the prompt's rendering "
                                 f"(prompt ends {prompt[-40:]!r}, full text there "
                                 f"{full[len(prompt) - 40:len(prompt)]!r})")
    rendering = _Text(full, _data_spans(tokenizer, full, [m["content"] for m in messages] + [response], location))
    return rendering.cut(0, len(prompt)), rendering.cut(len(prompt), len(full))


def _texts(example, tokenizer, use_chat_template):
    """(prompt, [responses]) `_Text`s of an example (chosen, and rejected when it has one)."""
    responses = [example["chosen"]] + ([example["rejected"]] if example["rejected"] else [])
    messages = example["prompt_messages"]
    if messages and (use_chat_template or not example["prompt"]):
        if not tokenizer.chat_template:
            raise records.BadExample(example["source"], "chat example without a chat template",
                                     f"the tokenizer in {tokenizer.path} has none")
        rendered = [_render_chat(tokenizer, messages, response, example["source"]) for response in responses]
        return rendered[0][0], [text for _, text in rendered]
    return _Text(example["prompt"]), [_Text(response) for response in responses]


def _special_text(example, pattern):
    """The first special token's text in an example's data, or None."""
    texts = [example["prompt"], example["chosen"], example["rejected"]] + [m["content"]
                                                                           for m in example["prompt_messages"]]
    return next((match.group() for match in map(pattern.search, texts) if match), None) if pattern else None


def _boundary_error(location, prompt_ids, response_ids, joint_ids, tokenizer):
    first = next(i for i, (a, b) in enumerate(zip(prompt_ids + response_ids, joint_ids + [None])) if a != b)
    around = slice(max(first - 2, 0), first + 3)
    show = lambda ids: [tokenizer.tokenizer.id_to_token(i) for i in ids[around]]
    return records.BadExample(
        location, "token boundary",
        f"prompt and response encoded apart give {show(prompt_ids + response_ids)} at token {first}, encoded "
        f"together {show(joint_ids)} (prompt has {len(prompt_ids)} tokens); set data.check_boundaries=False "
        "to train on the separate encodings anyway")


def tokenize(examples: Sequence[dict], tokenizer, *, bad, check_boundaries=True, use_chat_template=False,
             need_rejected=True, max_length=None, max_prompt_length=None):
    """`Tokenized` ids of `examples`; bad ones go to `bad.handle` (raised or counted).

    need_rejected: the examples must be pairs (DPO); an example without a rejected response is bad.
    max_length, max_prompt_length: what truncation (`layouts.truncate`) will keep at most of a
    response and of a prompt, in tokens; a longer text is cut before it is encoded, to bound the work
    (None: encode it whole). The ids are then the kept end of the prompt and start of the response.
    """
    inner = tokenizer.tokenizer
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    end_ids = set(tokenizer.eos_ids) | {eos_id}
    bos_id = added_bos(tokenizer)
    kept, prompts, responses, special_texts = [], [], [], []
    for example in examples:
        try:
            if need_rejected and not example["rejected"]:
                raise records.BadExample(example["source"], "no rejected response",
                                         "this split holds SFT examples, not preference pairs")
            prompt, texts = _texts(example, tokenizer, use_chat_template)
        except records.BadExample as error:
            bad.handle(error)
            continue
        special = _special_text(example, tokenizer.special_pattern)
        if special is not None:
            special_texts.append(f"{special!r} at {example['source']}")
        kept.append(example)
        prompts.append(prompt)
        responses.append(texts)
    if special_texts:
        logging.warning("%d examples hold the text of a special token, encoded as text, not as the token "
                        "(e.g. %s)", len(special_texts), ", ".join(special_texts[:3]))
    prompts, prompt_ids = _encode_kept(tokenizer, prompts, max_prompt_length, keep_end=True)
    flat_responses, response_ids = _encode_kept(tokenizer, [text for texts in responses for text in texts],
                                                max_length, keep_end=False)
    starts = np.cumsum([0] + [len(texts) for texts in responses])
    joint_ids = _encode(tokenizer, [prompts[i] + flat_responses[j] for i in range(len(kept))
                                    for j in range(starts[i], starts[i + 1])]) if check_boundaries \
        else [None] * len(response_ids)
    result = Tokenized([], [], [], bos_id)
    for i, (example, ids) in enumerate(zip(kept, prompt_ids)):
        location = example["source"]
        chat = prompts[i].data_spans is not None
        try:
            example_responses = []
            for response, joint in zip(response_ids[starts[i]:starts[i + 1]], joint_ids[starts[i]:starts[i + 1]]):
                if joint is not None and ids + response != joint:
                    raise _boundary_error(location, ids, response, joint, tokenizer)
                if chat:  # the response ends at the template's end-of-turn token (what generation emits)
                    ends = [j for j, token in enumerate(response) if token in end_ids]
                    response = response[:ends[-1] + 1] if ends else response
                if any(token in end_ids for token in response[:-1]):
                    raise records.BadExample(location, "end-of-generation token inside a response",
                                             f"{[inner.id_to_token(t) for t in response if t in end_ids]}")
                if not response or response[-1] not in end_ids:
                    response = response + [eos_id]
                example_responses.append(response)
            if bos_id is not None and ids[:1] != [bos_id]:
                ids = [bos_id] + ids
            if not ids:
                raise records.BadExample(location, "empty prompt",
                                         "the first response token needs a prompt token before it (or a BOS)")
        except records.BadExample as error:
            bad.handle(error)
            continue
        result.prompts.append(ids)
        result.responses.append(example_responses)
        result.sources.append(location)
    return result


def check_vocab(pairs, model_config, where):
    """Raises ValueError naming `where` when a token id of `pairs` ([{name: ids}]) is outside the model's vocabulary."""
    largest = max(max(max(ids, default=0) for ids in pair.values()) for pair in pairs)
    vocab_size = model_config.vocab_size
    if largest >= vocab_size:
        source = (f"the checkpoint model.init_from_hf={model_config.init_from_hf!r}" if model_config.init_from_hf
                  else "config.model (a preset, or set by the config file)")
        raise ValueError(f"{where}: token id {largest} is outside the model's vocabulary of {vocab_size} tokens, from "
                         f"{source}: the tokenizer that made these ids (data.tokenizer) is not the model's, or "
                         "config.model.vocab_size is too small for it")
