"""The model families this server can serve, and one clear refusal for any other model."""

from typing import Tuple

from swarm.petals_api import supported_model_types


class UnsupportedModel(Exception):
    """A model this server cannot serve correctly: its family, or its config as written."""


def supported_families() -> Tuple[str, ...]:
    """The model types (``config.json``'s ``model_type``) the swarm's blocks can be run for."""
    return tuple(sorted(supported_model_types()))


def unsupported(source: str, problem: str) -> UnsupportedModel:
    """The refusal of ``source`` for ``problem``, naming what is supported."""
    return UnsupportedModel(f"Cannot serve {source}: {problem}. This server serves the model families "
                            f"{', '.join(supported_families())} (Llama 2-style configs for llama)")


def check_servable(source: str) -> None:
    """Raises ``UnsupportedModel`` unless the model at ``source`` (a folder, or a hub name that can
    be reached) is of a supported family with a config its classes accept (an unknown RoPE
    scaling, such as Llama 3.1's ``llama3``, is refused rather than served wrong)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except KeyError as error:  # transformers has no config class for this model type
        raise unsupported(source, f"model type {error.args[0]!r} is unknown") from None
    except ValueError as error:
        if "rope_scaling" in str(error):
            raise unsupported(source, f"its rope_scaling is not one this server can apply ({error})") from None
        raise
    if config.model_type not in supported_model_types():
        raise unsupported(source, f"model type {config.model_type!r} is not supported")
