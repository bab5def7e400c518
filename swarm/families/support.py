"""Which model families this server serves, and one clear refusal for any other model."""

from typing import Tuple

from swarm.families.rope import UnsupportedRope

# How each supported model type is known to people (petals' own bloom and falcon included).
FAMILY_NAMES = {
    "bloom": "BLOOM",
    "falcon": "Falcon",
    "llama": "Llama 2 and 3.x, SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2 and Qwen2.5",
    "qwen3": "Qwen3 (dense)",
}


class UnsupportedModel(Exception):
    """A model this server cannot serve correctly: its family, or its config as written."""


def supported_families() -> Tuple[str, ...]:
    """The model types (``config.json``'s ``model_type``) the swarm's blocks can be run for."""
    from swarm.petals_api import supported_model_types

    return tuple(sorted(supported_model_types()))


def unsupported(source: str, problem: str) -> UnsupportedModel:
    """The refusal of ``source`` for ``problem``, naming what is supported."""
    families = ", ".join(f"{name} ({FAMILY_NAMES[name]})" if name in FAMILY_NAMES else name
                         for name in supported_families())
    return UnsupportedModel(f"Cannot serve {source}: {problem}. This server serves the model families {families}")


def check_servable(source: str) -> None:
    """Raises ``UnsupportedModel`` unless the model at ``source`` (a folder, or a hub name that can
    be reached) is of a supported family with a config our blocks apply exactly (an unknown RoPE
    scaling, or a sliding window a family's blocks cannot apply, is refused rather than served wrong)."""
    import swarm.petals_api  # noqa: F401  (registers our families' configs with AutoConfig)
    from transformers import AutoConfig

    from swarm.families.configs import FAMILY_CONFIGS

    family_configs = {config_class.model_type: config_class for config_class in FAMILY_CONFIGS}

    try:
        config = AutoConfig.from_pretrained(source)
    except KeyError as error:  # transformers has no config class for this model type
        raise unsupported(source, f"model type {error.args[0]!r} is unknown") from None
    except UnsupportedRope as error:
        raise unsupported(source, str(error)) from None
    except ValueError as error:
        if "rope_scaling" in str(error):  # a family of petals' own validates its scaling so
            raise unsupported(source, f"its rope_scaling is not one this server can apply ({error})") from None
        raise
    if config.model_type not in supported_families():
        raise unsupported(source, f"model type {config.model_type!r} is not supported")
    family_config = family_configs.get(config.model_type)
    if family_config is not None:
        reason = family_config.from_pretrained(source).unservable_reason()
        if reason is not None:
            raise unsupported(source, reason)
