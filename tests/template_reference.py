"""Chat templates rendered by a current transformers (4.57's ``apply_chat_template`` with
``tools``) in a process of its own: the independent reference our own rendering is checked against."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

from tests.family_reference import CHAT_TEMPLATES, REFERENCE_TRANSFORMERS

REFERENCE_VERSION = "4.57.6"
FAMILY_TEMPLATES = ("llama3", "qwen2", "qwen3")

_SCRIPT = r"""
import json, sys
import transformers
from transformers import AutoTokenizer

request = json.load(sys.stdin)
tokenizer = AutoTokenizer.from_pretrained(request["tokenizer"])
rendered = []
for case in request["cases"]:
    tokenizer.chat_template = case["template"]
    try:
        rendered.append({"text": tokenizer.apply_chat_template(
            case["messages"], tools=case["tools"], tokenize=False,
            add_generation_prompt=case["add_generation_prompt"], **case["options"])})
    except Exception as error:
        rendered.append({"error": f"{type(error).__name__}: {error}"})
json.dump({"version": transformers.__version__, "rendered": rendered}, sys.stdout)
"""


def family_template(family: str) -> str:
    """The text of ``tests/chat_templates/<family>.jinja``."""
    return (CHAT_TEMPLATES / f"{family}.jinja").read_text()


def reference_renderings(tokenizer_dir: Path, cases: Sequence[Dict[str, Any]]) -> List[Dict[str, str]]:
    """Each case (``template``, ``messages``, ``tools``, ``add_generation_prompt``, ``options``:
    the template's extra variables) rendered by the reference with the tokenizer of
    ``tokenizer_dir``: ``{"text": ...}``, or ``{"error": ...}`` where the template raised."""
    if not REFERENCE_TRANSFORMERS.is_dir():
        raise RuntimeError(f"the reference transformers is not installed in {REFERENCE_TRANSFORMERS} (run make test)")
    environment = dict(os.environ, PYTHONPATH=str(REFERENCE_TRANSFORMERS))
    result = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(
        {"tokenizer": str(tokenizer_dir), "cases": list(cases)}), env=environment, capture_output=True, text=True,
        check=True, timeout=300)
    answer = json.loads(result.stdout)
    assert answer["version"] == REFERENCE_VERSION
    return answer["rendered"]
