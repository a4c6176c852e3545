"""The tokenizer of a Hugging Face checkpoint: tokenizer.json (via `tokenizers`) with its special tokens
and chat template.

Special tokens come from tokenizer_config.json (or special_tokens_map.json); end-of-sequence ids also
from generation_config.json, where instruction-tuned models list every token that ends a turn
(Llama 3: <|end_of_text|> and <|eot_id|>). The chat template is rendered with jinja2 the way
transformers renders it, so prompts match what the model saw in training.
"""

import dataclasses
import datetime
import functools
import json
import os
import re
from typing import Optional

import tokenizers

from dpo_jax import storage
from dpo_jax.models.hf import TOKENIZER_FILES


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """`tokenizers.Tokenizer` plus the checkpoint's special tokens and chat template."""
    tokenizer: tokenizers.Tokenizer
    path: str
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None
    unk_token: Optional[str] = None
    eos_ids: tuple = ()  # every id that ends a generation
    chat_template: Optional[str] = None

    def token_id(self, token):
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self):
        return self.token_id(self.bos_token)

    @property
    def pad_id(self):
        """The pad token's id; None when the checkpoint defines none (GPT-2, Llama): pad with any id and mask."""
        return self.token_id(self.pad_token)

    def encode(self, text, add_special_tokens=True):
        """Token ids; `add_special_tokens` applies the checkpoint's post-processor (e.g. a leading BOS).

        The text of a special token (e.g. '<|endoftext|>') becomes that token: for text the code
        composes (a rendered chat template), not for text from data (`encode_text`)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def special_tokens(self):
        """{text: id} of the added tokens marked special (BOS, EOS, chat markers, ...)."""
        return {token.content: token_id for token_id, token in self.tokenizer.get_added_tokens_decoder().items()
                if token.special}

    @functools.cached_property
    def special_pattern(self):
        """A regex matching the text of any special token (longest first), or None when there is none."""
        texts = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    @functools.cached_property
    def _text_tokenizer(self):
        # A copy that encodes special tokens' text as ordinary text; the setting is per tokenizer
        # object, so the checkpoint's own (`tokenizer`) keeps parsing them.
        copy = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())
        copy.encode_special_tokens = True
        return copy

    def encode_text(self, texts):
        """Token ids of each text from data: no post-processor, and the text of a special token is
        encoded as text (split into ordinary tokens), so data cannot inject an EOS or a chat marker."""
        return [encoding.ids for encoding in self._text_tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_rendered(self, texts, data_spans):
        """Token ids of texts the code composed around data, e.g. chat template renderings: special
        tokens' text is a special token, except inside the (start, stop) character spans of
        `data_spans[i]` (the messages' contents), encoded as text as `encode_text` does."""
        ids = [None] * len(texts)
        plain = [i for i, spans in enumerate(data_spans) if not spans]
        for i, encoding in zip(plain, self.tokenizer.encode_batch([texts[i] for i in plain],
                                                                  add_special_tokens=False)):
            ids[i] = encoding.ids
        for i, spans in enumerate(data_spans):
            if spans:
                ids[i] = self._encode_outside(texts[i], spans)
        return ids

    def _encode_outside(self, text, spans):
        """Ids of `text` with special tokens parsed outside `spans` only. The tokenizer splits a text
        at its special tokens and encodes the pieces between them apart, so this is what it does
        where no span holds a special token's text."""
        pieces, specials, start = [], [], 0
        for match in self.special_pattern.finditer(text) if self.special_pattern else ():
            if any(a < match.end() and match.start() < b for a, b in spans):
                continue  # data
            pieces.append(text[start:match.start()])
            specials.append(self.special_tokens[match.group()])
            start = match.end()
        pieces.append(text[start:])
        encoded = self.encode_text(pieces)
        return [token for piece, special in zip(encoded, specials + [None])
                for token in piece + ([] if special is None else [special])]

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, *, add_generation_prompt=False, **variables):
        """The prompt text of `messages` ([{"role", "content"}, ...]) under the checkpoint's chat template."""
        if not self.chat_template:
            raise ValueError(f"The tokenizer in {self.path} has no chat template (not a chat model?)")
        try:
            import jinja2
            import jinja2.ext
            from jinja2 import sandbox
        except ImportError as error:
            raise ImportError("Rendering chat templates needs jinja2: pip install jinja2") from error

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # Jinja's own tojson escapes HTML characters, which transformers' templates do not expect.
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        # The environment transformers renders chat templates in.
        environment = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                            extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
        special = dict(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token,
                       unk_token=self.unk_token)
        return environment.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **variables)


class TokenizerFileError(FileNotFoundError, ValueError):
    """A checkpoint's tokenizer file is missing (a FileNotFoundError) or unreadable; a ValueError, as
    every bad input is, so the command line prints it as one line."""


def _read_json(path, name):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8-sig") as f:
            return json.load(f)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise TokenizerFileError(f"{file}: not a readable JSON file ({error})") from None


def _token(value):
    """A special token as saved by transformers: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(path, tokenizer_config):
    """From chat_template.jinja (transformers >= 4.47), chat_template.json, or tokenizer_config.json."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = _read_json(path, "chat_template.json").get("chat_template") or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


def load_tokenizer(path):
    """The tokenizer of the Hugging Face model directory `path` (local, or a URL: only its tokenizer
    files are fetched)."""
    source, path = path, storage.local_copy(path, names=TOKENIZER_FILES)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        hint = (" (it has only a slow-tokenizer file; convert it once with transformers: "
                "AutoTokenizer.from_pretrained(path).save_pretrained(path))"
                if any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.model", "vocab.json"))
                else "")
        raise TokenizerFileError(f"{source} has no tokenizer.json{hint}")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(file)
    except Exception as error:  # tokenizers raises plain Exceptions on a bad file
        raise TokenizerFileError(f"{file}: not a readable tokenizer.json ({error})") from None
    tokenizer_config = _read_json(path, "tokenizer_config.json")
    special_map = _read_json(path, "special_tokens_map.json")
    special = {name: _token(tokenizer_config.get(name) or special_map.get(name))
               for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    eos_ids = []
    if special["eos_token"] is not None and tokenizer.token_to_id(special["eos_token"]) is not None:
        eos_ids.append(tokenizer.token_to_id(special["eos_token"]))
    generation_eos = _read_json(path, "generation_config.json").get("eos_token_id")
    for token_id in generation_eos if isinstance(generation_eos, list) else [generation_eos]:
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    return Tokenizer(tokenizer=tokenizer, path=path, eos_ids=tuple(eos_ids),
                     chat_template=_chat_template(path, tokenizer_config), **special)
