"""Hugging Face checkpoints in and out, tokenizers, and logit parity with `transformers`.

The parity tests need the `parity` extra (transformers + CPU PyTorch) and skip without it; the
rest use checkpoints written by `save_hf` and run with the core install.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from conftest import host_devices, run_python
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_models import random_model, run

from dpo_jax import configs, models

FAMILIES = ["gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "gemma"]


def _preset(family):
    return "tiny" if family == "gpt2" else f"tiny-{family}"


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _tokens(shape, seed=0, vocab=64):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


# ---------------------------------------------------------------------------------------------
# save_hf / load_hf without transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_gives_the_same_parameters(family, tmp_path):
    model = random_model(_preset(family))
    models.save_hf(model, tmp_path / "out", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # several shards were written
    loaded = models.load_hf(tmp_path / "out")
    assert loaded.config.hf_model_type == family
    jax.tree.map(np.testing.assert_array_equal, _params(loaded), _params(model))


def test_load_in_bfloat16_and_save_as_stored(tmp_path):
    models.save_hf(random_model("tiny-llama"), tmp_path / "f32")
    model = models.load_hf(tmp_path / "f32", dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(_params(model))} == {jnp.dtype("bfloat16")}
    assert run(model, _tokens((1, 5))).dtype == jnp.float32  # logits: the unembedding's float32 accumulator
    models.save_hf(model, tmp_path / "bf16")
    assert {a.dtype.name for a in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {"bfloat16"}
    with open(tmp_path / "bf16" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_abstract_model_takes_the_architecture_from_config_json(tmp_path):
    models.save_hf(random_model("tiny-gemma"), tmp_path / "gemma")
    model_config = configs.model_config("tiny", init_from_hf=str(tmp_path / "gemma"), dtype="bfloat16")
    config = models.decoder_config(model_config)
    assert (config.hf_model_type, config.norm, config.head_dim, config.num_kv_heads) == ("gemma", "rmsnorm", 32, 1)
    assert config.dtype == "bfloat16"  # runtime fields stay with config.model
    _, abstract_params, _ = models.abstract_model(model_config)
    assert abstract_params["blocks"][0]["attention"]["query"]["kernel"].shape == (64, 4 * 32)


_MESH_SCRIPT = """
import sys
import jax, numpy as np
from flax import nnx
from dpo_jax import configs, models, sharding
path = sys.argv[1]
mesh_config = configs.base_config().mesh
mesh_config.update(fsdp=2, tensor=2)  # and data: the rest of the 8 devices
mesh = sharding.make_mesh(mesh_config)
model_config = configs.model_config("tiny", init_from_hf=path)
_, abstract_params, specs = models.abstract_model(model_config)
shardings = sharding.param_shardings(abstract_params, specs, mesh)
params = models.init_params(model_config, seed=0, shardings=shardings)
reference = nnx.to_pure_dict(nnx.state(models.load_hf(path), nnx.Param))  # on one device
def check(param, wanted, expected):
    assert param.sharding == wanted, (param.sharding, wanted)
    np.testing.assert_array_equal(np.asarray(param), expected)
    return param.addressable_shards[0].data.size < param.size
split = jax.tree.leaves(jax.tree.map(check, params, shardings, reference))
assert any(split), "no parameter was split over the mesh"
print("sharded", sum(split), "of", len(split))
"""


def test_init_from_hf_places_each_tensor_on_its_shards(tmp_path):
    models.save_hf(random_model("tiny-llama"), tmp_path / "llama")
    result = run_python(["-c", _MESH_SCRIPT, str(tmp_path / "llama")],
                        env={**host_devices(8), "JAX_PLATFORMS": "cpu"})
    assert "sharded" in result.stdout


def test_export_refuses_an_architecture_its_format_cannot_express(tmp_path):
    model = random_model("tiny-llama", hf_model_type="gpt2")
    with pytest.raises(ValueError, match="gpt2 checkpoint cannot express.*position_embedding='rope'"):
        models.save_hf(model, tmp_path / "out")


def test_export_refuses_a_directory_with_weights(tmp_path):
    models.save_hf(random_model("tiny"), tmp_path / "out")
    with pytest.raises(FileExistsError, match="already holds safetensors"):
        models.save_hf(random_model("tiny"), tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the culprit
# ---------------------------------------------------------------------------------------------

def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.load_hf(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        models.load_hf(tmp_path)


def test_unsupported_rope_type(tmp_path):
    models.save_hf(random_model("tiny-llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        models.load_hf(tmp_path)


def test_missing_tensor(tmp_path):
    models.save_hf(random_model("tiny-qwen2"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.k_proj.bias' is missing"):
        models.load_hf(tmp_path)


def test_no_weights(tmp_path):
    models.save_hf(random_model("tiny"), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        models.load_hf(tmp_path)


def test_no_tokenizer_json(tmp_path):
    models.save_hf(random_model("tiny"), tmp_path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        models.load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _write_tokenizer(path):
    """A small byte-level BPE tokenizer with special tokens and a chat template, as transformers saves them."""
    os.makedirs(path, exist_ok=True)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<|eot|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the policy prefers the chosen response over the rejected one"] * 20, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))


def test_tokenizer_has_the_checkpoints_special_tokens_and_template(tmp_path):
    _write_tokenizer(tmp_path)
    tokenizer = models.load_tokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_ids) == (0, 2, (1, 3))
    text = "the chosen response"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    pytest.importorskip("jinja2", reason="chat templates render with jinja2 (installed with the parity extra)")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<s><|user|>hi</s><|assistant|>"


def test_save_hf_copies_the_tokenizer(tmp_path):
    _write_tokenizer(tmp_path / "source")
    models.save_hf(random_model("tiny"), tmp_path / "source")
    models.save_hf(models.load_hf(tmp_path / "source"), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "source" / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Parity with transformers (the parity extra)
# ---------------------------------------------------------------------------------------------

def _transformers():
    pytest.importorskip("torch", reason="logit parity needs the parity extra: pip install -e '.[parity]'")
    return pytest.importorskip("transformers", reason="logit parity needs the parity extra: "
                                                      "pip install -e '.[parity]'")


def _hf_config(family):
    """A tiny random config of each family, with the features that distinguish it switched on."""
    transformers = _transformers()
    small = dict(vocab_size=96, max_position_embeddings=64)
    llama_like = dict(small, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64)
    return {
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, rotary_pct=0.5, **small),
        "gptj": lambda: transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                                                vocab_size=96),
        "llama": lambda: transformers.LlamaConfig(**llama_like, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32)),
        "mistral": lambda: transformers.MistralConfig(**llama_like, sliding_window=4),
        "qwen2": lambda: transformers.Qwen2Config(**llama_like),
        "gemma": lambda: transformers.GemmaConfig(**dict(llama_like, num_key_value_heads=1), head_dim=16),
    }[family]()


def _reference_model(family, path):
    """A random-initialised `transformers` model (biases and norms perturbed too), saved to `path`."""
    transformers = _transformers()
    import torch  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family), attn_implementation="eager").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:  # zero biases and unit norms would hide a mix-up
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(path)
    return model


def _reference_logits(model, input_ids, attention_mask=None):
    import torch  # pylint: disable=import-outside-toplevel
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return model(torch.tensor(np.asarray(input_ids)), attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, tmp_path):
    reference = _reference_model(family, tmp_path)
    model = models.load_hf(tmp_path)
    input_ids = _tokens((2, 12), vocab=96)
    np.testing.assert_allclose(run(model, input_ids), _reference_logits(reference, input_ids), rtol=0, atol=1e-4)
    # Right padding: segment ids here, attention_mask there; the real tokens must agree.
    lengths = np.array([12, 7])
    real = np.arange(12)[None] < lengths[:, None]
    ours = run(model, input_ids, segment_ids=jnp.asarray(real, jnp.int32))
    theirs = _reference_logits(reference, input_ids, real.astype(np.int64))
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(family, tmp_path):
    transformers = _transformers()
    _reference_model(family, tmp_path / "source")
    model = models.load_hf(tmp_path / "source")
    models.save_hf(model, tmp_path / "out", max_shard_bytes=30_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    input_ids = _tokens((2, 10), seed=1, vocab=96)
    np.testing.assert_allclose(_reference_logits(reloaded.eval(), input_ids), run(model, input_ids), rtol=0,
                               atol=1e-4)


def test_loads_a_checkpoint_sharded_by_transformers(tmp_path):
    reference = _reference_model("llama", tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    input_ids = _tokens((1, 9), seed=2, vocab=96)
    np.testing.assert_allclose(run(models.load_hf(tmp_path / "sharded"), input_ids),
                               _reference_logits(reference, input_ids), rtol=0, atol=1e-4)


def test_tokenizer_matches_transformers(tmp_path):
    transformers = _transformers()
    _write_tokenizer(tmp_path)
    ours = models.load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the policy prefers the chosen one"
    assert ours.encode(text) == theirs(text)["input_ids"]
    messages = [{"role": "user", "content": "which response?"}, {"role": "assistant", "content": "the chosen"}]
    for add_generation_prompt in (False, True):
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
            theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


# ---------------------------------------------------------------------------------------------
# A run that starts from a Hugging Face checkpoint, exported back
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_from_hf_then_export(tmp_path):
    from dpo_jax import checkpointing  # pylint: disable=import-outside-toplevel
    start = random_model("tiny-llama")
    models.save_hf(start, tmp_path / "start")
    _write_tokenizer(tmp_path / "start")
    workdir = tmp_path / "run"
    run_python(["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal", f"--workdir={workdir}",
                f"--config.model.init_from_hf={tmp_path / 'start'}"])
    run_python(["-m", "dpo_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"])

    exported = models.load_hf(tmp_path / "out")
    assert exported.config.hf_model_type == "llama"
    _, abstract_params, _ = models.abstract_model(configs.model_config(init_from_hf=str(tmp_path / "start")))
    trained = checkpointing.restore_params(str(workdir / "checkpoints" / "dpo"), checkpointing.with_shardings(
        abstract_params, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                      abstract_params)))
    jax.tree.map(np.testing.assert_array_equal, _params(exported), trained)
    assert not np.allclose(run(exported, _tokens((1, 8))), run(start, _tokens((1, 8))), atol=1e-4)  # it trained
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "start" / "tokenizer.json").read_bytes()
