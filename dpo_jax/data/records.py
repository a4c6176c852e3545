"""Raw records -> examples: reading users' JSONL / JSON / Parquet files and the papers' raw formats.

An *example* is the one shape every builder yields (see `builders.FEATURES`):
    {"prompt": str, "chosen": str, "rejected": str, "prompt_messages": [{"role", "content"}, ...],
     "source": "file:line"}
Text examples have `prompt`; chat examples have `prompt_messages` and an empty `prompt`, their
`chosen` / `rejected` being the contents of the final assistant message. SFT examples have an empty
`rejected`. Every bad record raises `BadExample` naming its file and line (or Parquet row); a
`BadExamples` collector either re-raises it or counts it, by `on_bad_example`. A file that cannot be
read at all raises `BadFile` (a BadExample, so a ValueError: the command line prints it as one line).
"""

import collections
import gzip
import json
import os
import re
import sys
import zlib

from dpo_jax import storage

ON_BAD_EXAMPLE = ("error", "skip")
ROLES = ("system", "user", "assistant")  # of chat messages
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class BadExample(ValueError):
    """A record that cannot become an example; `reason` is a short category for the summary counts."""

    def __init__(self, location, reason, detail=""):
        # One line, as the command line prints it (data may bring line breaks into the detail).
        super().__init__(f"{location}: {reason}{': ' + detail if detail else ''}".replace("\n", "\\n"))
        self.location, self.reason = location, reason


class BadFile(BadExample):
    """A file that cannot be read as records at all (missing, not gzip, no records, ...): raised whatever
    `on_bad_example` says."""


class BadExamples:
    """Raises bad examples (`policy='error'`) or counts them by reason (`policy='skip'`)."""
    MAX_KEPT = 20  # skipped examples named in the summary

    def __init__(self, policy):
        if policy not in ON_BAD_EXAMPLE:
            raise ValueError(f"on_bad_example must be one of {ON_BAD_EXAMPLE}, got {policy!r}")
        self.policy = policy
        self.counts = collections.Counter()
        self.kept = []

    def handle(self, error):
        if self.policy == "error":
            raise error
        self.counts[error.reason] += 1
        if len(self.kept) < self.MAX_KEPT:
            self.kept.append(str(error))

    def summary(self):
        return {"skipped": dict(self.counts), "skipped_examples": list(self.kept)}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")  # and any other *.gz: gzipped JSON lines
_BOM = "\ufeff"
_SEPARATORS = re.compile(r"[ \t\r\n,]*")  # between the items of a JSON array


def _hint(raw):
    """Why a file's bytes may not be text: a compressed file or another encoding, from its first bytes."""
    if raw.startswith(b"\x1f\x8b"):
        return " (the file is gzip-compressed: name it *.jsonl.gz)"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return " (a UTF-16 file? save it as UTF-8)"
    if raw.startswith(b"PAR1"):
        return " (a Parquet file: name it *.parquet)"
    return ""


def decode_utf8(raw, location):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadExample(location, "not UTF-8", f"byte {error.start}: {raw[error.start:error.start + 4]!r}"
                         f"{_hint(raw)}") from None


class _TooManyDigits(ValueError):
    pass


def _parse_int(digits):
    # Python refuses to convert an integer of more digits than this (a guard against quadratic time).
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        raise _TooManyDigits(f"an integer of {len(digits.lstrip('-'))} digits (at most {limit} are read)")
    return int(digits)


_DECODER = json.JSONDecoder(parse_int=_parse_int)


def _json_error(error, text):
    """The detail of a failure to parse JSON (`json.JSONDecodeError`, `_TooManyDigits` or `RecursionError`)."""
    if isinstance(error, RecursionError):
        return "nested too deeply to read (deeper than Python's recursion limit)"
    if isinstance(error, json.JSONDecodeError):
        detail = f"{error.msg} (column {error.colno})"
        if "\x00" in text:
            detail += f"; a NUL byte at column {text.index(chr(0)) + 1}: a binary or corrupted file?"
        elif text.strip() in ("[", "{"):
            detail += "; one record per line is expected: a pretty-printed JSON array belongs in a .json file"
        return detail
    return str(error)


def _parse_line(raw, location, first):
    """The record of one JSON line (bytes), or raises BadExample."""
    text = decode_utf8(raw, location).rstrip("\r\n")  # so that an error's column is on this line
    if first and text.startswith(_BOM):
        text = text[1:]  # a UTF-8 byte order mark, as some editors write
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and _TooManyDigits are ValueErrors
        raise BadExample(location, "bad JSON", _json_error(error, text)) from None


def _gzip_problem(error):
    if isinstance(error, EOFError):
        return "truncated gzip file (it ends before its end-of-stream marker)"
    if isinstance(error, gzip.BadGzipFile):
        return "not gzip-compressed, though its name ends in .gz"
    if isinstance(error, zlib.error):
        return f"corrupt gzip data ({error})"
    return f"cannot read it ({error})"


def _jsonl_records(path):
    line_number, records_seen = 0, 0
    try:
        with storage.open_file(path, "rb") as raw, (gzip.open(raw) if path.endswith(".gz") else raw) as f:
            for line_number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                location = f"{path}:{line_number}"
                records_seen += 1
                try:
                    record = _parse_line(raw, location, first=line_number == 1)
                except BadExample as error:
                    yield location, error
                    continue
                yield location, record
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise BadFile(f"{path}:{line_number + 1}" if line_number else path, "unreadable file",
                      _gzip_problem(error)) from None
    if not records_seen:
        raise BadFile(path, "no records", "the file is empty" if not line_number else "it has only blank lines")


def _json_array_records(path):
    """Items of a JSON array file, each located by the line it starts on."""
    with storage.open_file(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark, as some editors write, is not content
    except UnicodeDecodeError as error:
        start = error.start + (3 if raw.startswith(_BOM.encode()) else 0)  # counted after the mark
        line = raw.count(b"\n", 0, start) + 1
        raise BadFile(f"{path}:{line}", "not UTF-8", f"byte {start}: {raw[start:start + 4]!r}{_hint(raw)}") from None
    index = len(text) - len(text.lstrip())
    line = text.count("\n", 0, index) + 1
    if not text.strip():
        raise BadFile(path, "no records", "the file is empty" if not text else "it has only whitespace")
    if not text[index:index + 1] == "[":
        raise BadFile(f"{path}:{line}", "bad JSON",
                      "a .json file must hold one array of records (use .jsonl for one record per line)")
    index += 1
    records_seen = 0
    while True:
        position, index = index, _SEPARATORS.match(text, index).end()
        line += text.count("\n", position, index)
        location = f"{path}:{line}"
        if text[index:index + 1] == "]":
            rest = text[index + 1:].strip()
            if rest:
                raise BadFile(location, "bad JSON", f"more after the array's closing ']': {rest[:20]!r}")
            if not records_seen:
                raise BadFile(path, "no records", "the array is empty")
            return
        if index == len(text):
            raise BadFile(location, "bad JSON", "the array is not closed (a truncated file?)")
        try:
            record, end = _DECODER.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise BadFile(f"{path}:{error.lineno}", "bad JSON", _json_error(error, "")) from None
        except (ValueError, RecursionError) as error:
            raise BadFile(location, "bad JSON", _json_error(error, "")) from None
        line += text.count("\n", index, end)
        index = end
        records_seen += 1
        yield location, record


def _parquet_records(path):
    import pyarrow  # only Parquet users need it loaded
    import pyarrow.parquet
    try:
        with storage.open_file(path, "rb") as f:
            rows = pyarrow.parquet.read_table(f).to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as error:
        raise BadFile(path, "unreadable file", f"not a readable Parquet file ({error})") from None
    if not rows:
        raise BadFile(path, "no records", "the table has no rows")
    for row, record in enumerate(rows, 1):
        yield f"{path}: row {row}", record


def read_records(path, *, json_lines=False):
    """(location, record or BadExample) of a .jsonl[.gz], .json (one array) or .parquet file.

    `json_lines`: read a .json file as JSONL too (some datasets name their JSONL files .json).
    A file-level problem raises `BadFile` (a missing file, an unknown suffix, a broken gzip stream,
    a .json that is not one array, a file with no records), whatever `on_bad_example` says; a record
    that cannot be parsed is yielded as its BadExample.
    """
    if not storage.isfile(path):
        raise BadFile(path, "not a file" if storage.isdir(path) else "no such file",
                      "a directory" if storage.isdir(path) else "")
    if path.endswith(".parquet"):
        return _parquet_records(path)
    if path.endswith(".json") and not json_lines:
        return _json_array_records(path)
    if not path.endswith((".jsonl", ".json", ".gz")):
        raise BadFile(path, "unknown file type", f"expected one of {', '.join(SUFFIXES)}")
    return _jsonl_records(path)


# ---------------------------------------------------------------------------------------------
# Records -> examples
# ---------------------------------------------------------------------------------------------

def text_field(record, key, location):
    if key not in record or record[key] is None:
        raise BadExample(location, "missing field", repr(key))
    value = record[key]
    if not isinstance(value, str):
        raise BadExample(location, "wrong type", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def messages_field(value, key, location):
    """[{"role", "content"}] of a message list: objects with a role of `ROLES` and string content."""
    expected = f"{key!r} must be a list of {{'role', 'content'}} messages"
    if not isinstance(value, (list, tuple)):
        raise BadExample(location, "wrong type", f"{expected}, got {type(value).__name__}")
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise BadExample(location, "wrong type", f"{expected}: message {number} is a {type(message).__name__}")
        for field in ("role", "content"):
            if message.get(field) is None:
                raise BadExample(location, "wrong type", f"{expected}: message {number} has no {field!r}")
            if not isinstance(message[field], str):
                raise BadExample(location, "wrong type", f"{expected}: the {field!r} of message {number} is a "
                                 f"{type(message[field]).__name__}, not a string")
        if message["role"] not in ROLES:
            raise BadExample(location, "unknown role", f"{message['role'][:40]!r} in message {number} of {key!r} "
                             f"(roles are {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def example(location, *, pair, prompt="", chosen="", rejected="", prompt_messages=()):
    """The example, once its responses are checked: none empty, and a pair's two not identical."""
    for side in ("chosen", "rejected") if pair else ("chosen",):
        if not {"chosen": chosen, "rejected": rejected}[side].strip():
            raise BadExample(location, "empty response", side)
    if pair and chosen == rejected:
        raise BadExample(location, "identical chosen and rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "prompt_messages": list(prompt_messages),
            "source": location}


def final_assistant(messages, key, location):
    if not messages or messages[-1]["role"] != "assistant":
        raise BadExample(location, "wrong type", f"{key!r} must end with an assistant message")
    return messages[-1]["content"]


def preference_example(record, location):
    """A pair from {prompt, chosen, rejected} strings, chosen/rejected message lists, or the hosted-API format."""
    if not isinstance(record, dict):
        raise BadExample(location, "wrong type", f"a record must be a JSON object, got {type(record).__name__}")
    if "preferred_output" in record or "non_preferred_output" in record or "input" in record:
        # {"input": {"messages": [...]}, "preferred_output": [msg], "non_preferred_output": [msg]}
        if not isinstance(record.get("input"), dict) or "messages" not in record["input"]:
            raise BadExample(location, "missing field", "'input.messages'")
        prompt = messages_field(record["input"]["messages"], "input.messages", location)
        sides = {}
        for side, key in (("chosen", "preferred_output"), ("rejected", "non_preferred_output")):
            if key not in record:
                raise BadExample(location, "missing field", repr(key))
            sides[side] = final_assistant(messages_field(record[key], key, location), key, location)
        return example(location, pair=True, prompt_messages=prompt, **sides)
    for key in ("chosen", "rejected"):
        if key not in record or record[key] is None:
            raise BadExample(location, "missing field", repr(key))
    if isinstance(record["chosen"], (list, tuple)) or isinstance(record["rejected"], (list, tuple)):
        chosen = messages_field(record["chosen"], "chosen", location)
        rejected = messages_field(record["rejected"], "rejected", location)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared != len(chosen) - 1 or shared != len(rejected) - 1:
            raise BadExample(location, "messages differ before the last turn",
                             "chosen and rejected must share all messages but a final assistant message")
        return example(location, pair=True, prompt_messages=chosen[:-1],
                        chosen=final_assistant(chosen, "chosen", location),
                        rejected=final_assistant(rejected, "rejected", location))
    return example(location, pair=True, prompt=text_field(record, "prompt", location),
                    chosen=text_field(record, "chosen", location), rejected=text_field(record, "rejected", location))


def sft_example(record, location):
    """An SFT example from {prompt, completion} strings or a {messages} list ending with the assistant's turn."""
    if not isinstance(record, dict):
        raise BadExample(location, "wrong type", f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = messages_field(record["messages"], "messages", location)
        return example(location, pair=False, prompt_messages=messages[:-1],
                        chosen=final_assistant(messages, "messages", location))
    return example(location, pair=False, prompt=text_field(record, "prompt", location),
                    chosen=text_field(record, "completion", location))


# ---------------------------------------------------------------------------------------------
# Anthropic HH
# ---------------------------------------------------------------------------------------------

def hh_dialogue_messages(dialogue):
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [{"role": "user"|"assistant", "content"}]; a last empty turn
    is dropped."""
    parts = _HH_TURN.split(dialogue)  # ["", "Human", " text", "Assistant", " text", ...]
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    return messages[:-1] if messages and not messages[-1]["content"] else messages


def split_hh_pair(chosen, rejected, location):
    """(prompt, chosen response, rejected response, split_early) of two HH dialogues, losslessly.

    As the DPO paper's code does, the prompt ends at the last '\\n\\nAssistant:'. When the two
    dialogues already differ before the chosen one's last assistant turn (the paper's code would
    then cut the rejected dialogue at the wrong place), the prompt is instead the longest shared
    prefix that ends with '\\n\\nAssistant:', and `split_early` is True. Always
    prompt + chosen response == chosen and prompt + rejected response == rejected.
    """
    if chosen == rejected:
        raise BadExample(location, "identical chosen and rejected")
    end = chosen.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
    split_early = end < len(HH_ASSISTANT) or not rejected.startswith(chosen[:end])
    if split_early:
        shared = os.path.commonprefix([chosen, rejected])
        end = shared.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
        if end < len(HH_ASSISTANT):
            raise BadExample(location, "no shared prompt", "the dialogues differ before any assistant turn")
    prompt, chosen_response, rejected_response = chosen[:end], chosen[end:], rejected[end:]
    # A reply of only whitespace is real data here (a few harmless-base annotators preferred the
    # assistant saying nothing) and is kept; only a reply with no characters at all is empty.
    for side, response in (("chosen", chosen_response), ("rejected", rejected_response)):
        if not response:
            raise BadExample(location, "empty response", side)
    return prompt, chosen_response, rejected_response, split_early
