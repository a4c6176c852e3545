"""TFDS builders: the real HH file, the papers' raw formats and users' files, prepared offline; bad input."""

import gzip
import io
import json
import os
import tarfile

import pyarrow
import pyarrow.parquet
import pytest
import tensorflow_datasets as tfds
from conftest import SHARED_DATA

from dpo_jax.data import builders, records  # registers the builders

tfds.disable_progress_bar()
HH_DIR = os.path.join(SHARED_DATA, "hh-rlhf")
HH_TEST = os.path.join(HH_DIR, "harmless-base", "test.jsonl.gz")


def _prepare(name, data_dir, manual_dir=None, **kwargs):
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record", **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir else None))
    return builder


def _examples(builder, split):
    source = builder.as_data_source(split)
    text = lambda value: value.decode("utf-8")
    return [{key: text(example[key]) for key in ("prompt", "chosen", "rejected", "source")}
            | {"messages": [(text(r), text(c)) for r, c in zip(example["prompt_messages"]["role"],
                                                               example["prompt_messages"]["content"])]}
            for example in source.__getitems__(range(len(source)))]


@pytest.mark.skipif(not os.path.exists(HH_TEST), reason=f"the shared HH file {HH_TEST} is absent")
def test_hh_rlhf_split_is_lossless_on_the_real_file(tmp_path):
    builder = _prepare("hh_rlhf/harmless-base", tmp_path, HH_DIR)
    assert set(builder.info.splits) == {"test"}  # train.jsonl.gz is not in the shared folder
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        raw = {f"{HH_TEST}:{line}": json.loads(text) for line, text in enumerate(f, 1)}
    examples = _examples(builder, "test")
    assert len(examples) == len(raw) == 2312
    marker = "\n\nAssistant:"
    for example in examples:
        pair = raw[example["source"]]
        assert example["prompt"] + example["chosen"] == pair["chosen"]
        assert example["prompt"] + example["rejected"] == pair["rejected"]
        assert example["prompt"].endswith(marker) and example["chosen"] != example["rejected"]
        assert example["messages"][-1][0] == "user" and example["messages"][0] == (
            "user", pair["chosen"][len("\n\nHuman: "):pair["chosen"].index(marker)].strip())
    # Pairs whose rejected dialogue differs before the chosen one's last assistant turn (counted here
    # from the raw texts) are split earlier, at their longest shared prefix ending a turn.
    differ_early = sum(not pair["rejected"].startswith(pair["chosen"][:pair["chosen"].rfind(marker) + len(marker)])
                       for pair in raw.values())
    assert differ_early > 0
    assert builder.info.metadata["test"]["split_early"] == differ_early


def test_split_hh_pair_handles_pairs_that_differ_early():
    chosen = "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: bye\n\nAssistant: Bye!"
    rejected = "\n\nHuman: hi\n\nAssistant: Go away.\n\nAssistant: Really."
    prompt, chosen_response, rejected_response, early = records.split_hh_pair(chosen, rejected, "f:1")
    assert early and prompt == "\n\nHuman: hi\n\nAssistant:"
    assert prompt + chosen_response == chosen and prompt + rejected_response == rejected
    with pytest.raises(records.BadExample, match="f:2: no shared prompt"):
        records.split_hh_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: b", "f:2")


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_stanford_shp_and_tldr_from_raw_files(tmp_path):
    manual = tmp_path / "shp"
    _write_jsonl(str(manual / "askbaking" / "train.json"), [
        {"history": "Why does bread rise?", "human_ref_A": "Yeast.", "human_ref_B": "Magic.", "labels": 1},
        {"history": "Oven temp?", "human_ref_A": "Cold.", "human_ref_B": "Hot.", "labels": 0}])
    shp = _examples(_prepare("stanford_shp", tmp_path / "data", manual), "train")
    assert {(e["prompt"], e["chosen"], e["rejected"]) for e in shp} == {
        ("\n\nHuman: Why does bread rise?\n\nAssistant:", " Yeast.", " Magic."),
        ("\n\nHuman: Oven temp?\n\nAssistant:", " Hot.", " Cold.")}

    manual = tmp_path / "tldr"
    info = {"id": "x", "subreddit": "cats", "title": "My cat", "post": "It sleeps."}
    _write_jsonl(str(manual / "comparisons" / "batch3.json"), [
        {"info": info, "summaries": [{"text": " sleepy cat"}, {"text": "a dog"}], "choice": 0, "split": "train"},
        {"info": info, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 1, "split": "valid1"},
        {"info": {"id": "y", "article": "news", "site": "cnn"}, "summaries": [{"text": "a"}, {"text": "b"}],
         "choice": 1, "split": "train"}])
    _write_jsonl(str(manual / "tldr_3_filtered" / "train.jsonl"), [dict(info, summary="cat sleeps")])
    builder = _prepare("tldr_comparisons", tmp_path / "data", manual)
    assert set(builder.info.splits) == {"train", "validation", "sft_train"}  # no valid2 (test) comparison
    prompt = "SUBREDDIT: r/cats\nTITLE: My cat\nPOST: It sleeps.\nTL;DR:"
    [pair] = _examples(builder, "train")
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (prompt, " sleepy cat", " a dog")
    assert builder.info.metadata["train"]["not_reddit"] == 1
    [sft] = _examples(builder, "sft_train")
    assert (sft["prompt"], sft["chosen"], sft["rejected"]) == (prompt, " cat sleeps", "")


def test_ultrafeedback_and_imdb_from_raw_files(tmp_path):
    manual = tmp_path / "uf"
    os.makedirs(manual / "data")
    user = {"role": "user", "content": "Name a fruit."}
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{
        "prompt": "Name a fruit.", "chosen": [user, {"role": "assistant", "content": "Apple."}],
        "rejected": [user, {"role": "assistant", "content": "Rock."}]}]),
        str(manual / "data" / "train_prefs-00000-of-00001.parquet"))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{
        "messages": [user, {"role": "assistant", "content": "Pear."}]}]),
        str(manual / "data" / "train_sft-00000-of-00001.parquet"))
    builder = _prepare("ultrafeedback_binarized", tmp_path / "data", manual)
    [pair] = _examples(builder, "train")
    assert (pair["prompt"], pair["messages"], pair["chosen"], pair["rejected"]) == (
        "", [("user", "Name a fruit.")], "Apple.", "Rock.")
    assert _examples(builder, "sft_train")[0]["chosen"] == "Pear."

    manual = tmp_path / "imdb"
    os.makedirs(manual)
    reviews = {"aclImdb/train/pos/1_9.txt": "A wonderful film with great actors and a fine score.",
               "aclImdb/test/neg/2_1.txt": "Dull.  Two hours lost.", "aclImdb/train/unsup/3_0.txt": "no label"}
    with tarfile.open(manual / "aclImdb_v1.tar.gz", "w:gz") as archive:
        for name, text in reviews.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    builder = _prepare("imdb_prefixes", tmp_path / "data", manual)
    [train] = _examples(builder, "sft_train")
    [test] = _examples(builder, "sft_test")
    for example, name in ((train, "aclImdb/train/pos/1_9.txt"), (test, "aclImdb/test/neg/2_1.txt")):
        assert example["prompt"] + example["chosen"] == reviews[name]
        assert 2 <= len(example["prompt"].split(" ")) <= 8 and example["rejected"] == ""


def _user_files(tmp_path):
    """Preference files in each accepted shape, and SFT files."""
    jsonl = tmp_path / "pairs.jsonl"
    _write_jsonl(str(jsonl), [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}])
    chat = tmp_path / "chat.json"
    records_ = [  # a JSON array, one record on line 2, the next on lines 3-4
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},
        {"input": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]},
         "preferred_output": [{"role": "assistant", "content": "Hi!"}],
         "non_preferred_output": [{"role": "assistant", "content": "What."}]}]
    chat.write_text("[\n" + json.dumps(records_[0]) + ",\n" + json.dumps(records_[1], indent=None).replace(
        ', "preferred_output"', ',\n "preferred_output"') + "\n]")
    parquet = tmp_path / "pairs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"}]),
                                str(parquet))
    sft = tmp_path / "sft.jsonl"
    _write_jsonl(str(sft), [{"prompt": "Q: 3+3?", "completion": " 6"},
                            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    return {"train": [str(jsonl), str(chat), str(parquet)], "sft_train": [str(sft)]}


def test_preference_files_read_every_accepted_shape(tmp_path):
    files = _user_files(tmp_path)
    builder = _prepare("preference_files", tmp_path / "data", config=builders.FilesConfig.of(files))
    pairs = {(e["prompt"], tuple(e["messages"]), e["chosen"], e["rejected"]) for e in _examples(builder, "train")}
    assert pairs == {("Q: 2+2?", (), " 4", " 5"), ("", (("user", "hi"),), "hello", "go"),
                     ("", (("system", "Be kind."), ("user", "hi")), "Hi!", "What."), ("Q: 1+1?", (), " 2", " 3")}
    sources = sorted(e["source"] for e in _examples(builder, "train"))
    assert sources == sorted([f"{files['train'][0]}:1", f"{files['train'][1]}:2", f"{files['train'][1]}:3",
                              f"{files['train'][2]}: row 1"])
    sft = {(e["prompt"], e["chosen"], e["rejected"]) for e in _examples(builder, "sft_train")}
    assert sft == {("Q: 3+3?", " 6", ""), ("", "yo", "")}


BAD_LINES = {
    "bad JSON": b'{"prompt": "a", "chosen": "b", "rejected": \n',
    "missing field": b'{"prompt": "a", "chosen": "b"}\n',
    "empty response": b'{"prompt": "a", "chosen": "  ", "rejected": "c"}\n',
    "not UTF-8": b'{"prompt": "a\xff", "chosen": "b", "rejected": "c"}\n',
    "identical chosen and rejected": b'{"prompt": "a", "chosen": "b", "rejected": "b"}\n',
}
GOOD_LINE = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_a_bad_line_is_an_error_naming_file_and_line_or_is_skipped_and_counted(tmp_path, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD_LINE + GOOD_LINE + BAD_LINES[reason] + GOOD_LINE)
    config = builders.FilesConfig.of({"train": [str(path)]})
    with pytest.raises(records.BadExample, match=f"{path}:3: {reason}"):
        _prepare("preference_files", tmp_path / "strict", config=config)
    builder = _prepare("preference_files", tmp_path / "lenient", config=config, on_bad_example="skip")
    assert builder.info.splits["train"].num_examples == 3
    metadata = tfds.builder("preference_files", config=config, data_dir=str(tmp_path / "lenient")).info.metadata
    assert metadata["train"]["skipped"] == {reason: 1}
    assert metadata["train"]["skipped_examples"][0].startswith(f"{path}:3: {reason}")


def test_a_file_with_no_usable_examples_is_an_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(BAD_LINES["missing field"] * 2)
    with pytest.raises(ValueError, match="no usable examples"):
        _prepare("preference_files", tmp_path / "data", config=builders.FilesConfig.of({"train": [str(path)]}),
                 on_bad_example="skip")


def test_a_bad_json_array_file_names_the_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a", "chosen" "b"}\n]')
    with pytest.raises(records.BadExample, match=f"{path}:3: bad JSON"):
        _prepare("preference_files", tmp_path / "data", config=builders.FilesConfig.of({"train": [str(path)]}))


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def test_offline_with_no_raw_files_is_an_error_naming_manual_dir_before_any_download(tmp_path, monkeypatch):
    """An empty manual_dir and no DNS: refused at once, not after minutes of TFDS's download retries."""
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    looked_up = []

    def no_dns(host, *args, **kwargs):
        looked_up.append(host)
        raise builders.socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(builders.socket, "getaddrinfo", no_dns)
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match=r"hh_rlhf: cannot download https://raw\.githubusercontent\.com/anthropics/"
                                         r".*raw\.githubusercontent\.com does not resolve .*Name or service not known.*"
                                         r"Put the raw files in `manual_dir`.*config\.data\.manual_dir"):
        _prepare("hh_rlhf/harmless-base", tmp_path / "data", tmp_path / "raw")
    assert looked_up == ["raw.githubusercontent.com"]


def test_behind_a_proxy_the_download_is_left_to_it(monkeypatch):
    """A proxy resolves the host itself, so a name this machine cannot resolve is no reason to stop."""
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setattr(builders.socket, "getaddrinfo", lambda *args, **kwargs: pytest.fail("looked up a name"))
    builders._check_resolvable("hh_rlhf", ["https://raw.githubusercontent.com/a"])  # pylint: disable=protected-access
