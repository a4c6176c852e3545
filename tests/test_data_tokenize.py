"""Exact prompt/response token boundaries, on tiny BPE and byte-level BPE tokenizers trained here."""

import json
import os

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_jax.data import records, tokenize

CORPUS = ["Human: how do I bake bread?\n\nAssistant: Mix flour, water and yeast.",
          "The quick brown fox jumps over the lazy dog. Ça va? 東京 is big!"] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _save(tokenizer, directory, **config):
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return tokenize.load(directory)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A word-level-pretokenised BPE whose post-processor adds a BOS (as Llama's does)."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[UNK]", "<s>", "</s>"], show_progress=False))
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return _save(tokenizer, str(tmp_path_factory.mktemp("bpe")), bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return tokenize.load(tokenize.train_byte_level_bpe(CORPUS, str(tmp_path_factory.mktemp("bytes")), vocab_size=300))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(tokenize.train_byte_level_bpe(
        CORPUS, str(tmp_path_factory.mktemp("chat_base")), vocab_size=300), "tokenizer.json"))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return _save(tokenizer, str(tmp_path_factory.mktemp("chat")), eos_token="<|im_end|>", chat_template=CHATML)


def _example(prompt, chosen, rejected="", messages=()):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "prompt_messages": list(messages),
            "source": "test.jsonl:7"}


def _tokenize(tokenizer, examples, **options):
    return tokenize.tokenize(examples, tokenizer, bad=records.BadExamples("error"), need_rejected=False, **options)


# Random texts from characters and whole words the tokenizers know (so merges happen) and some they do not.
TEXT = st.lists(st.sampled_from(list("abdefloruwxy .,:!?\nÇ東") + ["a", "Assistant:", " bread", "flour", "\n\n"]),
                max_size=12).map("".join)


@pytest.mark.parametrize("name", ["bpe_tokenizer", "byte_tokenizer"])
def test_boundaries_are_exact_or_reported(name, request):
    tokenizer = request.getfixturevalue(name)
    inner = tokenizer.tokenizer
    bos_id = tokenizer.bos_id if name == "bpe_tokenizer" else None
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    encode = lambda text: inner.encode(text, add_special_tokens=False).ids

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompt=TEXT, response=TEXT.filter(lambda text: text.strip()))
    def check(prompt, response):
        joint, prompt_ids = encode(prompt + response), encode(prompt)
        if prompt_ids + encode(response) != joint:
            with pytest.raises(records.BadExample, match=r"test.jsonl:7: token boundary"):
                _tokenize(tokenizer, [_example(prompt, response)])
            return
        if not prompt_ids and bos_id is None:
            with pytest.raises(records.BadExample, match="empty prompt"):
                _tokenize(tokenizer, [_example(prompt, response)])
            return
        result = _tokenize(tokenizer, [_example(prompt, response)])
        ids, (scored,) = result.prompts[0], result.responses[0]
        if bos_id is not None:  # BOS once, first
            assert ids[0] == bos_id and bos_id not in ids[1:] + scored
            ids = ids[1:]
        assert ids == prompt_ids  # the prompt's own encoding ...
        assert ids + scored[:-1] == joint  # ... and with the response, the encoding of the whole text
        assert scored[-1] == eos_id and eos_id not in scored[:-1]  # EOS once, last

    check()


def test_a_boundary_failure_can_be_allowed(byte_tokenizer):
    # Byte-level BPE attaches a space to the word after it: "bake " + "bread" is not "bake" + " bread".
    example = _example("how do I bake ", "bread")
    with pytest.raises(records.BadExample, match="token boundary"):
        _tokenize(byte_tokenizer, [example])
    result = _tokenize(byte_tokenizer, [example], check_boundaries=False)
    encode = lambda text: byte_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert result.prompts[0] + result.responses[0][0][:-1] == encode("how do I bake ") + encode("bread")


def test_an_eos_text_in_a_response_is_text_and_the_eos_is_added_once(byte_tokenizer):
    result = _tokenize(byte_tokenizer, [_example("Human: hi", " yes<|endoftext|> no")])
    eos_id, response = byte_tokenizer.token_id("<|endoftext|>"), result.responses[0][0]
    assert response[-1] == eos_id and response.count(eos_id) == 1
    assert byte_tokenizer.tokenizer.decode(response[:-1], skip_special_tokens=False) == " yes<|endoftext|> no"

def test_chat_examples_use_the_template_and_end_at_its_end_of_turn_token(chat_tokenizer):
    messages = [{"role": "user", "content": "how do I bake bread?"}]
    result = tokenize.tokenize([_example("", "Mix flour.", "No.", messages)], chat_tokenizer,
                               bad=records.BadExamples("error"))
    prompt_ids, (chosen, rejected) = result.prompts[0], result.responses[0]
    decode = lambda ids: chat_tokenizer.tokenizer.decode(ids, skip_special_tokens=False)
    assert decode(prompt_ids) == "<|im_start|>user\nhow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(chosen) == "Mix flour.<|im_end|>" and decode(rejected) == "No.<|im_end|>"


def test_chat_examples_need_a_template(byte_tokenizer):
    with pytest.raises(records.BadExample, match="test.jsonl:7: chat example without a chat template"):
        _tokenize(byte_tokenizer, [_example("", "Mix flour.", messages=[{"role": "user", "content": "hi"}])])


def test_the_byte_level_bpe_trainer_is_deterministic(tmp_path):
    first = tokenize.train_byte_level_bpe(CORPUS, str(tmp_path / "a"), vocab_size=300)
    second = tokenize.train_byte_level_bpe(CORPUS, str(tmp_path / "b"), vocab_size=300)
    with open(os.path.join(first, "tokenizer.json"), "rb") as a, \
            open(os.path.join(second, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
    tokenizer = tokenize.load(os.path.join(first, "tokenizer.json"))
    assert tokenizer.tokenizer.get_vocab_size() == 300
    text = "Ça va? 東京 \n\nAssistant: ok"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: lossless on any text
