"""Registers our model families with petals' model registry and, where transformers has no
config class for a family, with transformers' ``AutoConfig``.

Each family gets its config class (``swarm.families.configs``) and petals' Llama client classes
bound to it: the client of every family keeps the embeddings, the final norm and the head here,
as Llama's does, and the swarm runs our ``DecoderBlock``. Llama's entry replaces petals' own, so
that every Llama block runs our code, and transformers' ``LlamaConfig`` accepts the RoPE
scalings our blocks apply (Llama 3.1's ``llama3`` among them), so that a Llama 3.x config loads
wherever one is read. Runs from ``swarm.petals_api``, in every process that uses petals.
"""

from transformers import LlamaConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from swarm.families.configs import FAMILY_CONFIGS
from swarm.families.rope import validate_scaling


def _client_classes(config_class):
    from petals.models.llama import (DistributedLlamaForCausalLM, DistributedLlamaForSequenceClassification,
                                     DistributedLlamaModel)

    family = config_class.__name__.replace("Config", "")
    bases = {"model": DistributedLlamaModel, "model_for_causal_lm": DistributedLlamaForCausalLM,
             "model_for_sequence_classification": DistributedLlamaForSequenceClassification}
    return {field: type(f"Distributed{family}{base.__name__.replace('DistributedLlama', '')}", (base,),
                        {"config_class": config_class, "__module__": __name__})
            for field, base in bases.items()}


def register_families() -> None:
    """Makes every family of ``FAMILY_CONFIGS`` loadable by ``AutoConfig`` and servable by petals."""
    from petals.utils.auto_config import _CLASS_MAPPING, _ModelClasses

    LlamaConfig._rope_scaling_validation = lambda config: validate_scaling(config.rope_scaling)
    for config_class in FAMILY_CONFIGS:
        if config_class.model_type not in CONFIG_MAPPING:
            CONFIG_MAPPING.register(config_class.model_type, config_class)
        _CLASS_MAPPING[config_class.model_type] = _ModelClasses(config=config_class, **_client_classes(config_class))
