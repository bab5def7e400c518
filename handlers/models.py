"""``GET /api/v1/models``: the models this server serves, with their chat and page settings."""

import dataclasses
from typing import Any, Dict

from handlers.base import APIHandler
from sessions.models import LoadedModel


def describe_model(loaded: LoadedModel) -> Dict[str, Any]:
    """A model as clients see it; ``model`` is what they pass to select it."""
    spec = loaded.spec
    chat = dataclasses.asdict(spec.chat)
    chat["stop_token"] = loaded.stop_token
    chat["extra_stop_sequences"] = list(spec.chat.extra_stop_sequences)
    chat["generation_params"] = dict(spec.chat.generation_params)
    chat["format"] = loaded.chat_format.describe()
    return {
        "model": spec.key,
        "repository": spec.repository,
        "adapter": spec.adapter,
        "aliases": list(spec.aliases),
        "family": spec.family,
        "public_api": spec.public_api,
        "num_blocks": loaded.num_blocks,
        "frontend": dataclasses.asdict(spec.frontend),
        "chat": chat,
    }


class ModelsHandler(APIHandler):
    """Lists every connected model, in declaration order."""

    requires_api_key = True

    def get(self) -> None:
        self.write({"ok": True, "models": [describe_model(loaded) for loaded in self.manager.registry.models]})
