"""Models this server cannot serve correctly are refused with one line naming what it serves."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.families import UnsupportedModel, check_servable, supported_families

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_hidden_layers": 2, "vocab_size": 100}


def model_folder(tmp_path: Path, config: dict) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("config, problem", [
    ({"model_type": "qwen2"}, "model type 'qwen2' is unknown"),  # no class for it in this transformers
    ({**LLAMA, "model_type": "mistral"}, "model type 'mistral' is not supported"),  # a class, but no petals family
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_scaling"),  # Llama 3.1: a config the family cannot apply as written
])
def test_an_unsupported_model_is_refused_naming_the_supported_families(tmp_path, config, problem):
    with pytest.raises(UnsupportedModel, match=problem) as refused:
        check_servable(model_folder(tmp_path, config))
    assert ", ".join(supported_families()) in str(refused.value)
    assert set(supported_families()) >= {"bloom", "falcon", "llama"}


def test_a_llama_2_style_model_passes(tmp_path):
    check_servable(model_folder(tmp_path, {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}}))


def test_the_server_refuses_it_at_start_up_in_one_line(tmp_path):
    folder = model_folder(tmp_path, {"model_type": "qwen3"})
    finished = subprocess.run([sys.executable, "server.py", "--model", folder, "--port", "0"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert "model type 'qwen3' is unknown" in finished.stderr and "llama" in finished.stderr
    assert "Traceback" not in finished.stderr
