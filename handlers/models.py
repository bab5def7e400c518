"""``GET /api/v1/models``: the models this server declares, with their chat and page settings,
and, for a model start-up refused, why it is not available."""

import dataclasses
from typing import Any, Dict, Union

from handlers.base import APIHandler
from handlers.native_replies import DeclaredModels
from model_specs import ModelSpec
from sessions.models import LoadedModel
from sessions.serving.registry import RefusedModel


def describe_declaration(spec: ModelSpec) -> Dict[str, Any]:
    """What any declared model shows; ``model`` is what clients pass to select it."""
    return {
        "model": spec.key,
        "repository": spec.repository,
        "adapter": spec.adapter,
        "aliases": list(spec.aliases),
        "family": spec.family,
        "public_api": spec.public_api,
        "frontend": dataclasses.asdict(spec.frontend),
    }


def describe_model(loaded: LoadedModel) -> Dict[str, Any]:
    """A served model as clients see it."""
    spec = loaded.spec
    chat = dataclasses.asdict(spec.chat)
    chat["stop_token"] = loaded.stop_token
    chat["extra_stop_sequences"] = list(spec.chat.extra_stop_sequences)
    chat["generation_params"] = dict(spec.chat.generation_params)
    chat["format"] = loaded.chat_format.describe()
    return {**describe_declaration(spec), "available": True, "num_blocks": loaded.num_blocks, "chat": chat}


def describe_refused(refused: RefusedModel) -> Dict[str, Any]:
    """A declared model this server cannot serve: no chat settings, and the reason as ``error``."""
    return {**describe_declaration(refused.spec), "available": False, "error": refused.reason}


def describe(model: Union[LoadedModel, RefusedModel]) -> Dict[str, Any]:
    """A declared model, served or refused."""
    return describe_refused(model) if isinstance(model, RefusedModel) else describe_model(model)


class ModelsHandler(APIHandler):
    """Lists every declared model, in declaration order (the refused ones marked unavailable)."""

    requires_api_key = True

    def get(self) -> None:
        self.write(DeclaredModels([describe(model) for model in self.manager.registry.declared()]).body())
