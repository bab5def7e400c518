"""Models this server cannot serve correctly are refused with one line naming what it serves;
every config of a family we serve loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.families import UnsupportedModel, check_servable, supported_families

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_hidden_layers": 2, "vocab_size": 100}
LLAMA_31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def model_folder(tmp_path: Path, config: dict) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("config, problem", [
    ({"model_type": "gemma"}, "model type 'gemma' is unknown"),  # no class for it in this transformers
    ({**LLAMA, "model_type": "mpt"}, "model type 'mpt' is not supported"),  # a class, but no family of ours
    ({**LLAMA, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "RoPE scaling 'longrope' is not supported"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor"),
    ({**LLAMA, "rope_scaling": {"type": "linear", "factor": 0.5}}, "factor must be a number >= 1"),
    ({**LLAMA, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     "sliding attention window"),  # a window on some layers only: a block cannot know its index
    ({**LLAMA, "model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]},
     "sliding attention window"),
])
def test_an_unsupported_model_is_refused_naming_the_supported_families(tmp_path, config, problem):
    with pytest.raises(UnsupportedModel, match=problem) as refused:
        check_servable(model_folder(tmp_path, config))
    assert "qwen2 (Qwen2 and Qwen2.5)" in str(refused.value) and "llama (Llama 2 and 3.x" in str(refused.value)


def test_the_families_served():
    assert set(supported_families()) == {"bloom", "falcon", "llama", "mistral", "qwen2", "qwen3"}


@pytest.mark.parametrize("config", [
    LLAMA,
    {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    {**LLAMA, "rope_scaling": LLAMA_31_SCALING, "head_dim": 16, "mlp_bias": False},  # Llama 3.1 to 3.3
    {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    {**LLAMA, "model_type": "mistral", "sliding_window": None},
    {**LLAMA, "model_type": "mistral", "sliding_window": 4096, "head_dim": 128},
    {**LLAMA, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21},
    {**LLAMA, "model_type": "qwen3", "head_dim": 128, "layer_types": ["full_attention"] * 2},
])
def test_configs_of_the_served_families_pass(tmp_path, config):
    check_servable(model_folder(tmp_path, config))


def test_the_server_refuses_it_at_start_up_in_one_line(tmp_path):
    folder = model_folder(tmp_path, {"model_type": "gemma"})
    finished = subprocess.run([sys.executable, "server.py", "--model", folder, "--port", "0"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert "model type 'gemma' is unknown" in finished.stderr and "qwen3" in finished.stderr
    assert "Traceback" not in finished.stderr
