"""TensorFlow Datasets builders of preference and SFT data, prepared to array_record (no TensorFlow needed).

    import dpo_jax.data  # registers the builders
    builder = tfds.builder("hh_rlhf/harmless-base", data_dir=DATA_DIR, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))
    pairs = builder.as_data_source("test")  # random access, for grain

Every builder yields `FEATURES` (see `records`): text fields, or chat messages, plus the source
file and line of each example. Each knows the URLs of its raw files and, given `manual_dir`, reads
them from there instead (offline), laid out as in the original repository; a split whose file is
absent is not generated. Bad records raise `records.BadExample` naming the file and line, or with
`on_bad_example="skip"` are skipped; the counts and the first few skipped locations are stored in
the prepared dataset's metadata (`builder.info.metadata`), per split.
"""

import collections
import dataclasses
import hashlib
import socket
import tarfile
import urllib.parse
import urllib.request
from typing import Tuple

import tensorflow_datasets as tfds

from dpo_jax import storage
from dpo_jax.data import records

FEATURES = tfds.features.FeaturesDict({
    "prompt": tfds.features.Text(),           # text prompt ("" for chat examples)
    "chosen": tfds.features.Text(),           # the preferred response (SFT: the completion)
    "rejected": tfds.features.Text(),         # the dispreferred response ("" for SFT examples)
    "prompt_messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
    "source": tfds.features.Text(),           # "file:line" (or "file: row N") the example came from
})
# Split names: preference pairs in train / validation / test, SFT examples in sft_<split>.
_MANUAL = "Put the raw files in `manual_dir` laid out as in the original repository (see the builder's URLS)."


def _check_resolvable(name, urls):
    """Fails at once, naming `manual_dir`, when the hosts of `urls` do not resolve and no proxy would
    resolve them instead: offline, TFDS's downloader retries each file for minutes before failing."""
    if urllib.request.getproxies():  # the proxy resolves the host, which may not resolve here
        return
    for host in sorted({urllib.parse.urlsplit(url).hostname for url in urls}):
        try:
            socket.getaddrinfo(host, None)
        except OSError as error:  # socket.gaierror: no such name, or no DNS at all
            raise ValueError(f"{name}: cannot download {urls[0]}: {host} does not resolve ({error}). Offline? "
                             f"{_MANUAL} (config.data.manual_dir in a dpo_jax config)") from error


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared machinery: raw files from manual_dir or URLs, records -> examples, bad-example policy."""
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL
    HOMEPAGE = ""

    def __init__(self, *, on_bad_example="error", file_format="array_record", **kwargs):
        # array_record by default: the random-access format grain reads, and the one TFDS writes
        # without TensorFlow (its own default, tfrecord, needs it).
        self._bad_examples = {}
        self._on_bad_example = on_bad_example
        records.BadExamples(on_bad_example)  # validates the policy before any work
        super().__init__(file_format=file_format, **kwargs)

    def _info(self):
        return self.dataset_info_from_configs(features=FEATURES, homepage=self.HOMEPAGE,
                                              metadata=tfds.core.MetadataDict())

    JSON_LINES = False  # the raw .json files hold one record per line

    # Subclasses define the raw files of each split (relative to manual_dir / the URL base) and
    # `_example(record, location, split, counts)`: an example, or None for a record that belongs
    # elsewhere (another split); `counts` collects dataset-specific counts for the metadata.
    def _split_files(self):
        """{split: (relative paths or glob patterns, ...)}."""
        raise NotImplementedError

    def _url(self, relative_path):
        return self.URL + relative_path

    def _has_records(self, split, paths):
        """Whether `paths` hold records of `split` (TFDS cannot write an empty split)."""
        del split, paths
        return True

    def _records(self, path):
        return records.read_records(path, json_lines=self.JSON_LINES)

    def _local_files(self, dl_manager, patterns):
        """Files of one split from manual_dir when any are there, else downloaded (no globs online)."""
        try:
            manual_dir = str(dl_manager.manual_dir)
        except AssertionError:  # no manual_dir given, or it is empty
            manual_dir = None
        if manual_dir is not None:
            return sorted(path for pattern in patterns for path in storage.glob(manual_dir, pattern))
        urls = [self._url(pattern) for pattern in patterns]
        _check_resolvable(self.name, urls)
        return [str(dl_manager.download(url)) for url in urls]

    def _split_generators(self, dl_manager):
        splits = {split: self._local_files(dl_manager, patterns) for split, patterns in self._split_files().items()}
        splits = {split: paths for split, paths in splits.items() if paths and self._has_records(split, paths)}
        if not splits:
            # A ValueError, as every bad input is: the command line prints it as one line.
            raise ValueError(f"{self.name}: none of the raw files {self._split_files()} were found")
        return {split: self._generate_examples(paths, split) for split, paths in splits.items()}

    def _generate_examples(self, paths, split):
        bad = records.BadExamples(self._on_bad_example)
        counts = collections.Counter()
        for path in paths:
            for location, record in self._records(path):
                try:
                    if isinstance(record, records.BadExample):
                        raise record
                    example = self._example(record, location, split, counts)
                except records.BadExample as error:
                    bad.handle(error)
                    continue
                if example is not None:
                    counts["examples"] += 1
                    yield location, example
        if not counts["examples"]:
            raise ValueError(f"{self.name}/{split}: no usable examples in {paths} (skipped: {dict(bad.counts)})")
        self.info.metadata[split] = {**bad.summary(), **counts, "on_bad_example": self._on_bad_example}


# ---------------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# ---------------------------------------------------------------------------------------------

class HhRlhf(_Builder):
    """Anthropic's helpful/harmless dialogues (Bai et al. 2022), the DPO paper's single-turn dialogue task.

    Raw format: one {"chosen": dialogue, "rejected": dialogue} per line of <config>/<split>.jsonl.gz.
    The prompt is the dialogue up to its last '\\n\\nAssistant:' (`records.split_hh_pair` says what
    happens to pairs that differ earlier; their count is `split_early` in the metadata);
    `prompt_messages` is the prompt's dialogue as chat messages. SFT on HH is on the chosen
    responses (the paper's Preferred-FT), so there are no separate SFT splits.
    """
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in (
        "helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")]
    HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
    URL = "https://raw.githubusercontent.com/anthropics/hh-rlhf/master/"

    def _split_files(self):
        return {split: (f"{self.builder_config.name}/{split}.jsonl.gz",) for split in ("train", "test")}

    def _example(self, record, location, split, counts):
        if not isinstance(record, dict):
            raise records.BadExample(location, "wrong type", "a record must be a JSON object")
        chosen, rejected = (records.text_field(record, key, location) for key in ("chosen", "rejected"))
        prompt, chosen_response, rejected_response, split_early = records.split_hh_pair(chosen, rejected, location)
        counts["split_early"] += split_early
        return {"prompt": prompt, "chosen": chosen_response, "rejected": rejected_response,
                "prompt_messages": records.hh_dialogue_messages(prompt), "source": location}


# ---------------------------------------------------------------------------------------------
# Stanford Human Preferences
# ---------------------------------------------------------------------------------------------

SHP_DOMAINS = ("askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs",
               "askengineers", "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience",
               "asksciencefiction", "asksocialscience", "askvet", "changemyview", "explainlikeimfive",
               "legaladvice")


class StanfordShp(_Builder):
    """SHP (Ethayarajh et al. 2022): pairs of Reddit comments, the more upvoted one preferred.

    Raw format: JSONL files <domain>/<split>.json with history, human_ref_A, human_ref_B and labels
    (1: A preferred). Prompt and responses in the HH format, as the DPO authors' code builds them:
    '\\n\\nHuman: <history>\\n\\nAssistant:' and ' <comment>'.
    """
    HOMEPAGE = "https://huggingface.co/datasets/stanfordnlp/SHP"
    URL = "https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main/"
    JSON_LINES = True

    def _split_files(self):
        return {split: tuple(f"{domain}/{split}.json" for domain in SHP_DOMAINS)
                for split in ("train", "validation", "test")}

    def _example(self, record, location, split, counts):
        if not isinstance(record, dict) or record.get("labels") not in (0, 1):
            raise records.BadExample(location, "missing field", "'labels' (0 or 1)")
        comments = [records.text_field(record, key, location) for key in ("human_ref_A", "human_ref_B")]
        chosen, rejected = comments if record["labels"] == 1 else comments[::-1]
        prompt = f"\n\nHuman: {records.text_field(record, 'history', location)}\n\nAssistant:"
        return records.preference_example(dict(prompt=prompt, chosen=" " + chosen, rejected=" " + rejected),
                                          location)


# ---------------------------------------------------------------------------------------------
# UltraFeedback, binarized (Zephyr)
# ---------------------------------------------------------------------------------------------

class UltrafeedbackBinarized(_Builder):
    """UltraFeedback (Cui et al. 2023) as binarized by HuggingFaceH4 for Zephyr: chat messages.

    Raw format: Parquet files data/<name>-*.parquet; pairs from the `chosen` / `rejected` message
    lists (train_prefs, test_prefs), SFT examples from `messages` (train_sft, test_sft).
    """
    HOMEPAGE = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized"
    URL = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized/resolve/main/"
    SPLITS = {"train": "train_prefs", "test": "test_prefs", "sft_train": "train_sft", "sft_test": "test_sft"}

    def _split_files(self):
        return {split: (f"data/{name}-*.parquet",) for split, name in self.SPLITS.items()}

    def _url(self, relative_path):
        return self.URL + relative_path.replace("*", "00000-of-00001")

    def _example(self, record, location, split, counts):
        if not isinstance(record, dict):
            raise records.BadExample(location, "wrong type", "a record must be an object")
        if split.startswith("sft_"):
            return records.sft_example({"messages": record.get("messages")}, location)
        return records.preference_example({"chosen": record.get("chosen"), "rejected": record.get("rejected")},
                                          location)


# ---------------------------------------------------------------------------------------------
# OpenAI summarize-from-feedback (TL;DR)
# ---------------------------------------------------------------------------------------------

TLDR_COMPARISON_FILES = tuple(f"comparisons/batch{i}.json" for i in range(3, 23)) + (
    "comparisons/batch0_cnndm.json", "comparisons/cnndm0.json", "comparisons/cnndm2.json",
    "comparisons/edit_b2_eval_test.json")


def tldr_prompt(info, location):
    """The prompt of the DPO paper's TL;DR runs (Stiennon et al.'s format): subreddit, title, post, 'TL;DR:'."""
    if not isinstance(info, dict):
        raise records.BadExample(location, "missing field", "'info'")
    subreddit, title, post = (records.text_field(info, key, location) for key in ("subreddit", "title", "post"))
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


class TldrComparisons(_Builder):
    """Human comparisons of Reddit TL;DR summaries (Stiennon et al. 2020), the DPO paper's summarisation run.

    Raw format: JSONL files comparisons/*.json of {"info": {post, title, subreddit, ...},
    "summaries": [{"text"}, {"text"}], "choice": 0|1, "split": train|valid1|valid2} (valid1 is
    the validation split, valid2 the test split); CNN/DM comparisons (no Reddit post) are left
    out and counted as `not_reddit`. The SFT splits are the filtered TL;DR posts the paper
    fine-tuned on: tldr_3_filtered/{train,valid,test}.jsonl of {subreddit, title, post, summary}.
    Responses are ' ' + the summary.
    """
    HOMEPAGE = "https://github.com/openai/summarize-from-feedback"
    URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/"
    JSON_LINES = True
    COMPARISON_SPLITS = {"train": "train", "valid1": "validation", "valid2": "test"}

    def _split_files(self):
        return {"train": TLDR_COMPARISON_FILES, "validation": TLDR_COMPARISON_FILES, "test": TLDR_COMPARISON_FILES,
                "sft_train": ("tldr_3_filtered/train.jsonl",), "sft_validation": ("tldr_3_filtered/valid.jsonl",),
                "sft_test": ("tldr_3_filtered/test.jsonl",)}

    def _has_records(self, split, paths):
        # The comparison files mix the three splits; a split none of them holds is not generated.
        if split.startswith("sft_"):
            return True
        return any(isinstance(record, dict) and self.COMPARISON_SPLITS.get(record.get("split")) == split
                   for path in paths for _, record in self._records(path))

    def _example(self, record, location, split, counts):
        if not isinstance(record, dict):
            raise records.BadExample(location, "wrong type", "a record must be a JSON object")
        if split.startswith("sft_"):
            summary = records.text_field(record, "summary", location)
            return records.sft_example({"prompt": tldr_prompt(record, location), "completion": " " + summary.strip()},
                                       location)
        if record.get("split") not in self.COMPARISON_SPLITS:
            raise records.BadExample(location, "missing field", f"'split' (one of {tuple(self.COMPARISON_SPLITS)})")
        if self.COMPARISON_SPLITS[record["split"]] != split:
            return None
        if isinstance(record.get("info"), dict) and "post" not in record["info"]:
            counts["not_reddit"] += 1  # a CNN/DM article
            return None
        summaries = record.get("summaries")
        if not (isinstance(summaries, list) and len(summaries) == 2 and record.get("choice") in (0, 1)):
            raise records.BadExample(location, "missing field", "'summaries' (two) and 'choice' (0 or 1)")
        texts = [" " + records.text_field(summary, "text", location).strip() if isinstance(summary, dict) else None
                 for summary in summaries]
        return records.preference_example(dict(prompt=tldr_prompt(record.get("info"), location),
                                               chosen=texts[record["choice"]], rejected=texts[1 - record["choice"]]),
                                          location)


# ---------------------------------------------------------------------------------------------
# IMDb prefixes (controlled sentiment generation)
# ---------------------------------------------------------------------------------------------

class ImdbPrefixes(_Builder):
    """IMDb reviews (Maas et al. 2011), the reviews of TFDS's imdb_reviews, each split into a prefix and the rest.

    The DPO paper's controlled-sentiment task prompts with 2-8 token prefixes of IMDb reviews; its
    preference pairs are then sampled from the SFT model and labelled by a sentiment classifier,
    so this dataset holds prompts and SFT text only (`rejected` is empty). The prefix is the first
    2-8 space-separated words (the count fixed per review by a hash of its file name), so that it
    does not depend on a tokenizer; prompt + chosen is the review exactly.
    Raw file: aclImdb_v1.tar.gz (the archive imdb_reviews downloads), from manual_dir or the URL.
    """
    HOMEPAGE = "https://ai.stanford.edu/~amaas/data/sentiment/"
    URL = "http://ai.stanford.edu/~amaas/data/sentiment/"

    def _split_files(self):
        return {split: ("aclImdb_v1.tar.gz",) for split in ("sft_train", "sft_test")}

    def _has_records(self, split, paths):
        """Whether `paths` hold records of `split` (TFDS cannot write an empty split)."""
        del split, paths
        return True

    def _records(self, path):
        """(location, review text) of the labelled reviews of both splits (aclImdb/<split>/<pos|neg>/<id>.txt)."""
        with storage.open_file(path, "rb") as raw, tarfile.open(fileobj=raw) as archive:
            for member in archive:
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 4 and parts[2] in ("pos", "neg") and parts[3].endswith(".txt"):
                    location = f"{path}:{member.name}"
                    try:
                        yield location, records.decode_utf8(archive.extractfile(member).read(), location)
                    except records.BadExample as error:
                        yield location, error

    def _example(self, record, location, split, counts):
        if location.split(":")[-1].split("/")[1] != split[len("sft_"):]:
            return None
        words = record.split(" ")
        # 2-8 words, leaving at least one for the completion.
        num_words = min(2 + int(hashlib.sha256(location.rsplit("/", 1)[-1].encode()).hexdigest(), 16) % 7,
                        len(words) - 1)
        if num_words < 2:
            raise records.BadExample(location, "review too short", f"{len(words)} words")
        prompt = " ".join(words[:num_words])
        return records.sft_example({"prompt": prompt, "completion": record[len(prompt):]}, location)


# ---------------------------------------------------------------------------------------------
# Users' own files
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class FilesConfig(tfds.core.BuilderConfig):
    """Which files make which split, e.g. {"train": ("a.jsonl",), "sft_train": ("b.parquet",)}.

    Splits named sft_* hold SFT records ({prompt, completion} or {messages}); the others hold
    preference records ({prompt, chosen, rejected}, chosen/rejected message lists, or the
    hosted-API format). The config's name hashes the paths and the files' contents, so a changed
    file is prepared anew (whatever its size and modification time).
    """
    files: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, files):
        """From {split: [paths]}."""
        files = tuple(sorted((split, tuple(storage.absolute(p) for p in paths)) for split, paths in files.items()))
        for split, paths in files:
            for path in paths:
                if not storage.isfile(path):
                    directory = storage.isdir(path)
                    raise records.BadFile(path, "not a file" if directory else "no such file",
                                          f"{'a directory, ' if directory else ''}given as a {split} file")
        state = [(split, path, storage.file_digest(path)) for split, paths in files for path in paths]
        return cls(name="files-" + hashlib.sha256(repr(state).encode()).hexdigest()[:16], files=files)


class PreferenceFiles(_Builder):
    """A user's own JSONL (optionally .gz) / JSON (one array) / Parquet files; formats in `records`.

        tfds.builder("preference_files", config=FilesConfig.of({"train": [...], "test": [...]}), data_dir=...)
    """
    MANUAL_DOWNLOAD_INSTRUCTIONS = None

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(paths, split) for split, paths in self.builder_config.files}

    def _example(self, record, location, split, counts):
        make = records.sft_example if split.startswith("sft_") else records.preference_example
        return make(record, location)
