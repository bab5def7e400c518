"""Convert a GGUF file (as llama.cpp writes them) into a transformers model folder our nodes serve.

Architectures (``general.architecture``): ``llama`` (Llama 2 and 3.x, SmolLM2, and Mistral, which
llama.cpp writes as llama), ``qwen2`` (Qwen2, Qwen2.5) and ``qwen3`` (dense Qwen3). The result
(config.json with the family's ``model_type``, generation_config.json, model.safetensors in float32
and the tokenizer files) loads with our families' configs and ``AutoTokenizer.from_pretrained``,
which is what a swarm node and client need. What the families' blocks cannot run exactly (another
architecture, mixture-of-experts, partial rotary, unknown tensors or RoPE scalings) is refused
with a ValueError naming it.

``convert_gguf_once`` converts a file once into a folder under a cache directory and reuses it
until the file changes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import shutil
import types
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import gguf
import numpy as np
from safetensors.numpy import save_file
from transformers import GenerationConfig

from swarm.families.rope import RotaryEmbedding
from swarm.gguf_tensors import ROPE_FREQS, checkpoint_tensors, layer_tensor_kind, read_tensor
from swarm.gguf_tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

# The transformers class each family's checkpoints name in config.json.
_ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ATTENTION_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output")
_MLP_PROJECTIONS = ("ffn_gate", "ffn_up", "ffn_down")
# Which attention projections may have biases in each family: all or none, or exactly Qwen2's.
_ALLOWED_BIASES = {"llama": (set(), set(_ATTENTION_PROJECTIONS)), "mistral": (set(),),
                   "qwen2": ({"attn_q", "attn_k", "attn_v"},), "qwen3": (set(), set(_ATTENTION_PROJECTIONS))}
# llama.cpp's converter takes Llama 3.1's original context from a top-level config key that
# Llama 3.x configs do not have, so its rope_freqs always use this default (Llama 3.x's value).
_LLAMA3_ORIGINAL_CONTEXT = 8192
# Written last into a converted folder, with the fingerprint of the file it came from.
_MARKER = ".complete"
_REQUIRED = object()


def _f32(value: float) -> float:
    # GGUF stores floats as float32; go through numpy's shortest float32 repr so that
    # 1e-5 is written as 1e-05 rather than 9.999999747378752e-06.
    return float(str(np.float32(value)))


class _MappedFileReader(gguf.GGUFReader):
    """The gguf package's reader over a plain array view of the file's memory map. The reader
    slices the map once per metadata item, and numpy's memmap subclass costs microseconds a
    slice: a vocabulary of 49,152 tokens and as many merges took 1.6 s to read, 0.6 s this way."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._data = mapped.view(np.ndarray)  # the view keeps the map open


class _Metadata:
    """A GGUF file's metadata, with the architecture's keys read by their short names."""

    def __init__(self, reader: gguf.GGUFReader):
        self.values = {name: field.contents() for name, field in reader.fields.items()}
        self.arch = self.values.get("general.architecture")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """``{arch}.key``, or ``default``; ValueError when a required key is missing."""
        name = f"{self.arch}.{key}"
        if name in self.values:
            return self.values[name]
        if default is _REQUIRED:
            raise ValueError(f"the GGUF file has no {name!r}")
        return default

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        """An integer key (a per-layer list, as some architectures write, is refused)."""
        value = self.get(key, default)
        if not isinstance(value, int):
            raise ValueError(f"{self.arch}.{key} is {value!r}; only one value for all layers can be converted")
        return value


def _our_llama3_frequencies(scaling: Dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    config = types.SimpleNamespace(rope_theta=theta, max_position_embeddings=1, rope_scaling=scaling)
    return RotaryEmbedding(config, head_dim).inv_freq.double().numpy()


def _fit_llama3(factors: np.ndarray, wavelengths: np.ndarray, original: int) -> Dict[str, Any]:
    """Llama 3 parameters whose frequency factors are ``factors`` at these wavelengths.

    Llama 3 keeps short wavelengths (factor 1), slows long ones by ``factor`` and blends those
    between with a weight ``smooth`` linear in 1 / wavelength: a line ``A / w - B`` that is above 1
    where the factor is 1 and below 0 where it is ``factor``. Only the factors at the model's own
    wavelengths matter, so any such line gives the same model.
    """
    factor = float(factors.max())
    inverse = 1.0 / wavelengths
    kept, slowed = np.isclose(factors, 1.0, rtol=1e-6), np.isclose(factors, factor, rtol=1e-6)
    blended = ~(kept | slowed)
    smooth = (1.0 / factors[blended] - 1.0 / factor) / (1.0 - 1.0 / factor)
    # Closest to the blend on each side: the longest kept and the shortest slowed wavelength.
    kept_edge = inverse[kept].min() if kept.any() else None
    slowed_edge = inverse[slowed].max() if slowed.any() else 0.0
    if blended.sum() >= 2:
        slope, intercept = np.polyfit(inverse[blended], smooth, 1)
    elif blended.sum() == 1:
        point = inverse[blended][0]
        bounds = [smooth[0] / (point - slowed_edge)]
        if kept_edge is not None:
            bounds.append((1.0 - smooth[0]) / (kept_edge - point))
        slope = 2 * max(bounds)  # steep enough to pass above 1 and below 0 at the neighbours
        intercept = smooth[0] - slope * point
    else:  # the line crosses 0 and 1 at the thirds of the gap between the neighbours
        if kept_edge is None:
            raise ValueError("its rope_freqs.weight slows every frequency alike")
        third = (kept_edge - slowed_edge) / 3
        slope = 1.0 / third
        intercept = -slope * (slowed_edge + third)
    low_over_span = -intercept
    if slope <= 0 or low_over_span <= 0:
        raise ValueError("its rope_freqs.weight does not follow Llama 3's RoPE scaling")
    span = original / slope  # high_freq_factor - low_freq_factor
    low = low_over_span * span
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": low + span,
            "original_max_position_embeddings": original}


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, original: int) -> Optional[Dict[str, Any]]:
    """The ``llama3`` rope_scaling for llama.cpp's frequency factors (``rope_freqs.weight``, which
    divide the rotation frequencies), checked against our own Llama 3 frequencies."""
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"its rope_freqs.weight has shape {factors.shape}, not ({head_dim // 2},)")
    factors = factors.astype(np.float64)
    if np.all(factors == 1.0):
        return None
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.min() < 1.0 or np.any(np.diff(factors) < 0):
        raise ValueError("its rope_freqs.weight does not follow Llama 3's RoPE scaling (factors from 1 up)")
    wanted = base / factors
    # Llama 3.x's own parameters first, so that their configs read as published.
    standard = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    for scaling in (standard, _fit_llama3(factors, 2 * math.pi / base, original)):
        if np.allclose(_our_llama3_frequencies(scaling, theta, head_dim), wanted, rtol=1e-5, atol=0):
            return scaling
    raise ValueError("its rope_freqs.weight does not follow Llama 3's RoPE scaling")


def _rope_scaling(meta: _Metadata, rope_freqs: Optional[np.ndarray], theta: float,
                  head_dim: int) -> Optional[Dict[str, Any]]:
    kind = meta.get("rope.scaling.type", "none")
    if rope_freqs is not None:
        if kind != "none":
            raise ValueError(f"it has both rope_freqs.weight and RoPE scaling {kind!r}")
        original = meta.get("rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT)
        return _llama3_scaling(rope_freqs, theta, head_dim, original)
    if kind == "none":
        return None
    factor = _f32(meta.get("rope.scaling.factor"))
    if kind == "linear":
        # The older form ("type"), which transformers' own Llama config also accepts.
        return {"type": "linear", "factor": factor}
    if kind != "yarn":
        raise ValueError(f"its RoPE scaling {kind!r} is not supported (supported: linear, yarn, Llama 3's)")
    ext_factor = meta.get("rope.scaling.yarn_ext_factor", -1.0)
    if ext_factor >= 0 and ext_factor != 1.0:
        raise ValueError(f"its YaRN extrapolation factor {ext_factor} is not supported")
    if meta.get("rope.scaling.yarn_log_multiplier", 0.0):
        raise ValueError("its YaRN log multiplier is not supported")
    scaling = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": meta.get("rope.scaling.original_context_length")}
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                      ("yarn_attn_factor", "attention_factor")):
        if f"{meta.arch}.rope.scaling.{key}" in meta.values:
            scaling[name] = _f32(meta.get(f"rope.scaling.{key}"))
    return scaling


def _family(meta: _Metadata, kinds: set) -> Dict[str, Any]:
    """The family's ``model_type`` and options, from the architecture and the tensors present."""
    biases = {part for part in _ATTENTION_PROJECTIONS if f"{part}.bias" in kinds}
    mlp_biases = {part for part in _MLP_PROJECTIONS if f"{part}.bias" in kinds}
    norms = {part for part in ("attn_q_norm", "attn_k_norm") if f"{part}.weight" in kinds}
    window = meta.integer("attention.sliding_window", 0)
    if meta.arch == "llama":
        model_type = "mistral" if window else "llama"
    else:
        model_type = meta.arch
        if window:
            raise ValueError(f"its sliding attention window is not supported for {meta.arch}")
    if biases not in _ALLOWED_BIASES[model_type]:
        raise ValueError(f"its attention biases ({', '.join(sorted(biases)) or 'none'}) do not fit {model_type}")
    if mlp_biases not in (set(), set(_MLP_PROJECTIONS)):
        raise ValueError(f"it has biases on only some feed-forward projections ({', '.join(sorted(mlp_biases))})")
    if norms != ({"attn_q_norm", "attn_k_norm"} if model_type == "qwen3" else set()):
        raise ValueError(f"its query/key norms ({', '.join(sorted(norms)) or 'none'}) do not fit {model_type}")
    family = {"model_type": model_type, "architectures": [_ARCHITECTURE_CLASSES[model_type]],
              "mlp_bias": bool(mlp_biases)}
    if model_type in ("llama", "qwen3"):
        family["attention_bias"] = bool(biases)
    if model_type == "mistral":
        family["sliding_window"] = window
    if model_type in ("qwen2", "qwen3"):
        family.update(use_sliding_window=False, sliding_window=None)
    return family


def build_config(meta: _Metadata, tensors: Dict[str, gguf.ReaderTensor]) -> Dict[str, Any]:
    """config.json of the model in a GGUF file, for the family that serves it (see the module doc)."""
    if meta.arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"unsupported GGUF architecture {meta.arch!r}: only 'llama' (Llama 2 and 3.x, Mistral, "
                         "SmolLM2), 'qwen2' (Qwen2 and Qwen2.5) and 'qwen3' (dense Qwen3) can be converted")
    if meta.values.get("split.count", 1) > 1:
        raise ValueError("it is one part of a split GGUF model; merge the parts into one file first")
    if meta.get("expert_count", 0):
        raise ValueError("mixture-of-experts GGUF models are not supported")
    hidden, heads = meta.integer("embedding_length"), meta.integer("attention.head_count")
    head_dim = meta.integer("attention.key_length", hidden // heads)
    if meta.integer("attention.value_length", head_dim) != head_dim:
        raise ValueError("its keys and values differ in size, which no family here has")
    if meta.integer("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"its rotary embedding covers {meta.get('rope.dimension_count')} of {head_dim} head "
                         "dimensions; only full rotation is supported")
    if "token_embd.weight" not in tensors:
        raise ValueError("it has no token embeddings (token_embd.weight)")
    theta = _f32(meta.get("rope.freq_base", 10000.0))
    rope_freqs = read_tensor(tensors[ROPE_FREQS]) if ROPE_FREQS in tensors else None
    blocks = meta.integer("block_count")
    config = {
        **_family(meta, {layer_tensor_kind(name) for name in tensors} - {None}),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF lists dimensions innermost first
        "hidden_size": hidden,
        "intermediate_size": meta.integer("feed_forward_length"),
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.integer("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.integer("context_length"),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, rope_freqs, theta, head_dim),
        "rms_norm_eps": _f32(meta.get("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.values.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.values.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.values.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if config["model_type"] in ("qwen2", "qwen3"):
        config["max_window_layers"] = blocks
    return config


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert the GGUF file ``gguf_path`` into a transformers model folder ``out_dir``.

    Every tensor is dequantized to float32. The folder is assembled under a temporary
    name next to ``out_dir`` and renamed at the end, so ``out_dir`` only ever exists
    complete. Raises FileExistsError if ``out_dir`` exists and ValueError for an
    architecture, tensor or tokenizer this converter does not handle. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    try:
        reader = _MappedFileReader(str(gguf_path))
    except (ValueError, IndexError) as error:  # the gguf package's answers to a truncated or foreign file
        raise ValueError(f"it is not a complete GGUF file ({error})") from None
    meta = _Metadata(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = build_config(meta, tensors)
    tokenizer = build_tokenizer(meta.values, config["max_position_embeddings"])
    # llama.cpp permutes the query and key rows of the llama architecture only.
    qk_heads = (config["num_attention_heads"], config["num_key_value_heads"]) if meta.arch == "llama" else None
    weights = checkpoint_tensors(tensors.values(), qk_heads)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, so the final rename stays on one file system; mkdir (unlike
    # mkdtemp's 0700) gives the folder the usual permissions for the umask.
    tmp_dir = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.partial"
    tmp_dir.mkdir()
    try:
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        weights_file = tmp_dir / "model.safetensors"
        save_file(weights, weights_file, metadata={"format": "pt"})
        # safetensors always creates its file 0600; make it as readable as config.json.
        shutil.copymode(tmp_dir / "config.json", weights_file)
        # Carries bos/eos/pad over, so generate() stops at EOS.
        GenerationConfig(**{key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                            if config[key] is not None}).save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _fingerprint(gguf_path: Path) -> Dict[str, Any]:
    stat = gguf_path.stat()
    return {"source": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def convert_gguf_once(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """The folder converted from the GGUF file ``gguf_path``: ``cache_dir / "gguf" / <file name
    without .gguf>`` (a folder of its own, so that no file's name can take the default model's).

    The first call converts the file (``convert_gguf``) and marks the folder complete with the
    file's path, size and modification time; later calls return the folder at once unless the
    file changed, in which case it is converted again. Processes converting the same file wait
    for each other. Raises ValueError for what the converter refuses.
    """
    gguf_path = Path(gguf_path).resolve()
    cache_dir = Path(cache_dir) / "gguf"
    model_dir = cache_dir / gguf_path.stem
    marker = model_dir / _MARKER
    fingerprint = _fingerprint(gguf_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{gguf_path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and _read_marker(marker) == fingerprint:
            return model_dir
        if model_dir.exists():
            logger.info("removing %s, converted from another or an older file", model_dir)
            shutil.rmtree(model_dir)
        logger.info("converting %s into %s...", gguf_path, model_dir)
        convert_gguf(gguf_path, model_dir)
        marker.write_text(json.dumps(fingerprint))
    logger.info("ready at %s", model_dir)
    return model_dir


def _read_marker(marker: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(marker.read_text())
    except ValueError:  # an empty or foreign marker: not ours
        return None
