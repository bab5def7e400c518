"""The configs of the model families we serve, and what each family's blocks differ in.

Every family here is a Llama-style decoder (``swarm.families.block``). Its config class reads
the family's ``config.json`` (with that family's defaults for fields a checkpoint leaves out)
and declares the block's variations, as properties or, where a family fixes one, a class value:
``qkv_bias``, ``output_bias``, ``mlp_bias``, ``qk_norm``, ``head_dim`` and ``attention_window``. ``unservable_reason`` names a
config option the block cannot apply, so that such a model is refused instead of served wrong.

They are built on transformers' ``LlamaConfig`` (which every family's fields extend) and on
petals' client options, so that petals' server and client accept them as they do its own Llama.
"""

import os
from typing import Optional, Union

import swarm.compat  # noqa: F401  (must precede petals)
from petals.client.config import ClientConfig
from petals.client.lm_head import LMHeadConfig
from petals.client.ptune import PTuneConfig
from transformers import LlamaConfig

from swarm.families.block import DecoderBlock, SelfAttention
from swarm.families.rope import scaling_type, validate_scaling
from swarm.prefix import dht_prefix_for


class FamilyConfig(LlamaConfig, ClientConfig, PTuneConfig, LMHeadConfig):
    """A Llama-style family's config, as petals' server and client use it."""

    block_class = DecoderBlock
    attn_class = SelfAttention
    block_prefix = "model.layers"
    # Values of the family's own config class for fields its checkpoints may leave out.
    family_defaults = {}

    def __init__(self, **kwargs):
        for name, value in self.family_defaults.items():
            kwargs.setdefault(name, value)
        head_dim, mlp_bias = kwargs.pop("head_dim", None), kwargs.pop("mlp_bias", False)
        super().__init__(**kwargs)
        self.head_dim = head_dim or self.hidden_size // self.num_attention_heads
        self.mlp_bias = bool(mlp_bias)  # whether the feed-forward projections have biases

    def _rope_scaling_validation(self) -> None:
        validate_scaling(self.rope_scaling)

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head (petals sizes the attention caches with it)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_bias(self) -> bool:
        """Whether the query, key and value projections have biases."""
        return bool(getattr(self, "attention_bias", False))

    @property
    def output_bias(self) -> bool:
        """Whether the attention's output projection has a bias."""
        return bool(getattr(self, "attention_bias", False))

    @property
    def qk_norm(self) -> bool:
        """Whether each head's queries and keys are RMS-normalized before the rotation."""
        return False

    @property
    def attention_window(self) -> Optional[int]:
        """How many positions back a query may attend (itself included); None: all of them."""
        return None

    def unservable_reason(self) -> Optional[str]:
        """Why our blocks cannot run this config exactly, or None when they can."""
        return None

    @property
    def context_length(self) -> int:
        """The most positions the model was made for: ``max_position_embeddings``, which ``dynamic``
        RoPE scaling stretches by its factor (the other scalings' configs give the stretched length)."""
        scaling = self.rope_scaling or {}
        if scaling_type(scaling) == "dynamic":
            return int(self.max_position_embeddings * scaling["factor"])
        return self.max_position_embeddings

    @classmethod
    def from_pretrained(cls, model_name_or_path: Union[str, os.PathLike, None], *args,
                        dht_prefix: Optional[str] = None, **kwargs):
        """Loads the config as petals' client does, deriving the DHT prefix by our one rule."""
        if dht_prefix is None and model_name_or_path is not None and not os.path.isdir(model_name_or_path):
            dht_prefix = dht_prefix_for(str(model_name_or_path))
        result = super().from_pretrained(model_name_or_path, *args, dht_prefix=dht_prefix, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config.pretraining_tp = 1
        config.use_cache = True  # petals' servers always keep the attention caches
        return result


class LlamaFamilyConfig(FamilyConfig):
    """Llama 2 and Llama 3.0 to 3.3 (with 3.1's ``llama3`` RoPE scaling), and SmolLM2."""

    model_type = "llama"


class MistralFamilyConfig(FamilyConfig):
    """Mistral: Llama blocks without biases, each query seeing at most ``sliding_window`` positions."""

    model_type = "mistral"
    family_defaults = {"max_position_embeddings": 4096 * 32, "sliding_window": 4096, "num_key_value_heads": 8}
    qkv_bias = output_bias = False  # whatever attention_bias says

    @property
    def attention_window(self) -> Optional[int]:
        return getattr(self, "sliding_window", None)


class _QwenConfig(FamilyConfig):
    family_defaults = {"vocab_size": 151936, "max_position_embeddings": 32768, "bos_token_id": None,
                       "eos_token_id": None, "use_sliding_window": False, "sliding_window": 4096,
                       "max_window_layers": 28}

    def unservable_reason(self) -> Optional[str]:
        # Qwen's windowed layers are the ones from max_window_layers on, but a block cannot know its index.
        layer_types = getattr(self, "layer_types", None)
        windowed = (any(kind != "full_attention" for kind in layer_types) if layer_types
                    else self.use_sliding_window and self.sliding_window is not None
                    and self.max_window_layers < self.num_hidden_layers)
        return "its layers use a sliding attention window, which is not supported for this family" if windowed else None


class Qwen2FamilyConfig(_QwenConfig):
    """Qwen2 and Qwen2.5: biases on the query, key and value projections."""

    model_type = "qwen2"
    qkv_bias, output_bias = True, False


class Qwen3FamilyConfig(_QwenConfig):
    """Qwen3 (dense): an RMSNorm on each head's queries and keys, a head size of its own, no biases."""

    model_type = "qwen3"
    family_defaults = {**_QwenConfig.family_defaults, "head_dim": 128}
    qk_norm = True


FAMILY_CONFIGS = (LlamaFamilyConfig, MistralFamilyConfig, Qwen2FamilyConfig, Qwen3FamilyConfig)
