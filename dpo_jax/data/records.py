"""Raw records -> examples: reading users' JSONL / JSON / Parquet files and the papers' raw formats.

An *example* is the one shape every builder yields (see `builders.FEATURES`):
    {"prompt": str, "chosen": str, "rejected": str, "prompt_messages": [{"role", "content"}, ...],
     "source": "file:line"}
Text examples have `prompt`; chat examples have `prompt_messages` and an empty `prompt`, their
`chosen` / `rejected` being the contents of the final assistant message. SFT examples have an empty
`rejected`. Every bad record raises `BadExample` naming its file and line (or Parquet row); a
`BadExamples` collector either re-raises it or counts it, by `on_bad_example`.
"""

import collections
import gzip
import json
import os
import re

from dpo_jax import storage

ON_BAD_EXAMPLE = ("error", "skip")
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class BadExample(ValueError):
    """A record that cannot become an example; `reason` is a short category for the summary counts."""

    def __init__(self, location, reason, detail=""):
        super().__init__(f"{location}: {reason}{': ' + detail if detail else ''}")
        self.location, self.reason = location, reason


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

def decode_utf8(raw, location):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadExample(location, "not UTF-8", f"byte {error.start}: {raw[error.start:error.start + 4]!r}") from None


def _jsonl_records(path):
    with storage.open_file(path, "rb") as raw, (gzip.open(raw) if path.endswith(".gz") else raw) as f:
        for line_number, raw in enumerate(f, 1):
            location = f"{path}:{line_number}"
            if not raw.strip():
                continue
            try:
                text = decode_utf8(raw, location)
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield location, BadExample(location, "bad JSON", error.msg)
                continue
            except BadExample as error:
                yield location, error
                continue
            yield location, record


def _json_array_records(path):
    """Items of a JSON array file, each located by the line it starts on."""
    with storage.open_file(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise BadExample(f"{path}:{line}", "not UTF-8", f"byte {error.start}") from None
    decoder = json.JSONDecoder()
    index = len(text) - len(text.lstrip())
    if not text[index:index + 1] == "[":
        raise BadExample(f"{path}:{text.count(chr(10), 0, index) + 1}", "bad JSON",
                         "a .json file must hold one array of records (use .jsonl for one record per line)")
    index += 1
    while True:
        index += len(text[index:]) - len(text[index:].lstrip(" \t\r\n,"))
        location = f"{path}:{text.count(chr(10), 0, index) + 1}"
        if text[index:index + 1] == "]":
            return
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise BadExample(f"{path}:{error.lineno}", "bad JSON", error.msg) from None
        yield location, record


def _parquet_records(path):
    import pyarrow.parquet  # only Parquet users need it loaded
    with storage.open_file(path, "rb") as f:
        table = pyarrow.parquet.read_table(f)
    for row, record in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {row}", record


def read_records(path, *, json_lines=False):
    """(location, record or BadExample) of a .jsonl[.gz], .json (one array) or .parquet file.

    `json_lines`: read a .json file as JSONL too (some datasets name their JSONL files .json).
    A file-level error (a .json that is not an array, or cannot be parsed past a point) raises.
    """
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".parquet"):
        return _parquet_records(path)
    if path.endswith(".json") and not json_lines:
        return _json_array_records(path)
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
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise BadExample(location, "wrong type", f"{key!r} must be a list of {{'role', 'content'}} messages")
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
