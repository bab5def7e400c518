"""The configs that public checkpoints of each family carry (as their repositories publish them,
and as petals' servers announce their blocks) load into our families with the right shapes."""

import json
from types import SimpleNamespace

import pytest
import torch

from swarm.families import check_servable
from swarm.prefix import dht_prefix_for

LLAMA_31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
MISTRAL_7B_INSTRUCT_V03 = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0",
    "use_cache": True, "vocab_size": 32768}

# repository, config, petals' DHT prefix for it, and the shapes of one block's q, k and o projections.
PUBLIC = [
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", LLAMA_31_8B_INSTRUCT, "Meta-Llama-3-1-8B-Instruct-hf",
     (4096, 4096), (1024, 4096), (4096, 4096)),
    ("Qwen/Qwen2.5-7B-Instruct", QWEN25_7B_INSTRUCT, "Qwen2-5-7B-Instruct-hf", (3584, 3584), (512, 3584), (3584, 3584)),
    ("Qwen/Qwen3-0.6B", QWEN3_06B, "Qwen3-0-6B-hf", (2048, 1024), (1024, 1024), (1024, 2048)),
    ("mistralai/Mistral-7B-Instruct-v0.3", MISTRAL_7B_INSTRUCT_V03, "Mistral-7B-Instruct-v0-3-hf",
     (4096, 4096), (1024, 4096), (4096, 4096)),
]


def _folder(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("repository, config, prefix, q_shape, k_shape, o_shape", PUBLIC)
def test_a_public_config_loads_into_its_family(tmp_path, repository, config, prefix, q_shape, k_shape, o_shape):
    from accelerate import init_empty_weights
    from petals.utils.auto_config import AutoDistributedConfig

    folder = _folder(tmp_path, config)
    check_servable(folder)
    assert dht_prefix_for(repository) == prefix  # the name petals' own servers announce the blocks under
    loaded = AutoDistributedConfig.from_pretrained(folder, dht_prefix=prefix)
    assert loaded.model_type == config["model_type"] and loaded.dht_prefix == prefix
    with init_empty_weights():  # shapes only: no memory for a real model's weights
        block = loaded.block_class(loaded)
    attention = block.self_attn
    assert tuple(attention.q_proj.weight.shape) == q_shape and tuple(attention.k_proj.weight.shape) == k_shape
    assert tuple(attention.o_proj.weight.shape) == o_shape
    assert (attention.q_proj.bias is not None) == (config["model_type"] == "qwen2")
    assert hasattr(attention, "q_norm") == (config["model_type"] == "qwen3")
    assert attention.window is None  # none of these attends through a window
    assert attention.rotary.kind == ("llama3" if repository.startswith("meta-llama") else "default")


def test_a_server_sizes_the_attention_caches_by_the_configs_head_dim(tmp_path):
    from petals.server.backend import TransformerBackend
    from petals.utils.auto_config import AutoDistributedConfig

    config = AutoDistributedConfig.from_pretrained(_folder(tmp_path, QWEN3_06B), dht_prefix="Qwen3-0-6B-hf")
    backend = SimpleNamespace(config=config, module=SimpleNamespace(devices=[torch.device("cpu")]),
                              shard_num_heads=[16], dtype=torch.bfloat16)
    keys, values = TransformerBackend.get_inference_cache_descriptors(backend, batch_size=1, max_length=10)
    assert tuple(keys.size) == (1, 8, 128, 10) and tuple(values.size) == (1, 8, 10, 128)  # not 1024 / 16 = 64


def test_a_server_announces_its_free_cache_by_the_configs_head_dim(tmp_path):
    from petals.server.server import ModuleAnnouncerThread
    from petals.utils.auto_config import AutoDistributedConfig

    config = AutoDistributedConfig.from_pretrained(_folder(tmp_path, QWEN3_06B), dht_prefix="Qwen3-0-6B-hf")
    announcer = ModuleAnnouncerThread(["Qwen3-0-6B-hf.0"], None, SimpleNamespace(torch_dtype="bfloat16"), None,
                                      block_config=config,
                                      memory_cache=None, update_period=1, expiration=1)
    assert announcer.bytes_per_token == 8 * 128 * 2  # key/value heads x head_dim x 2 bytes, not 1024 / 2 x 2


def test_announcements_of_newer_petals_servers_are_read():
    from petals.data_structures import ServerInfo, ServerState

    announced = (2, 812.5, {"start_block": 0, "end_block": 16, "version": "2.3.0.dev2", "torch_dtype": "bfloat16",
                            "quant_type": "nf4", "cache_tokens_left": 262144, "inference_rps": 41.0,
                            "a_field_of_a_later_release": {"x": 1}})
    info = ServerInfo.from_tuple(announced)
    assert (info.state, info.start_block, info.end_block, info.cache_tokens_left) == (ServerState.ONLINE, 0, 16, 262144)


@pytest.mark.parametrize("config, context", [
    (LLAMA_31_8B_INSTRUCT, 131072), (QWEN3_06B, 40960),
    ({**MISTRAL_7B_INSTRUCT_V03, "max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     8192),  # dynamic scaling stretches the context it was trained for
])
def test_sessions_are_held_within_the_models_context(tmp_path, config, context):
    from petals.utils.auto_config import AutoDistributedConfig

    from model_specs import ChatSettings, FrontendSettings, ModelSpec
    from sessions.models import within_context

    loaded = AutoDistributedConfig.from_pretrained(_folder(tmp_path, config), dht_prefix="x-hf")
    assert loaded.context_length == context
    spec = ModelSpec(repository="org/model", family="x", frontend=FrontendSettings(name="x"),
                     chat=ChatSettings(max_session_length=context * 2))
    assert within_context(spec, loaded.context_length).chat.max_session_length == context
    shorter = ModelSpec(repository="org/model", family="x", frontend=FrontendSettings(name="x"))
    assert within_context(shorter, loaded.context_length) is shorter  # 2048 fits: unchanged
