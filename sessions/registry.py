"""The model registry: the served models, loaded once, looked up by name, with their access policy."""

import logging
from typing import Dict, List, Sequence

from config import ManagerSettings, ModelSpec
from sessions.errors import ModelNotPublic, NotReady, UnknownModel
from sessions.executor import BlockingExecutor
from sessions.models import LoadedModel, load_model

logger = logging.getLogger(__name__)


class ModelRegistry:
    """Loads every declared model's client (in the executor), finds models, disconnects them.

    A model is named by its repository (or adapter) or one of its aliases; no name means the
    first declared model. Models declared ``public_api: false`` are served only to callers the
    handler vouches for (the server's own chat page).
    """

    def __init__(self, specs: Sequence[ModelSpec], initial_peers: Sequence[str], device: str, torch_dtype: str,
                 settings: ManagerSettings, executor: BlockingExecutor):
        self.specs = tuple(specs)
        self.initial_peers = list(initial_peers)
        self.device = device
        self.torch_dtype = torch_dtype
        self.settings = settings
        self.executor = executor
        self._models: Dict[str, LoadedModel] = {}
        self._by_name: Dict[str, LoadedModel] = {}

    async def load(self) -> None:
        """Connects the client of every declared model to the swarm, in declaration order."""
        for spec in self.specs:
            loaded = await self.executor.run(load_model, spec, self.initial_peers, self.device, self.torch_dtype,
                                             self.settings)
            self._models[spec.key] = loaded
            for name in spec.names():
                self._by_name[name] = loaded

    @property
    def loaded(self) -> bool:
        """Whether the models are connected."""
        return bool(self._models)

    @property
    def models(self) -> List[LoadedModel]:
        """Connected models, in declaration order."""
        self._require_loaded()
        return list(self._models.values())

    def public_models(self, trusted: bool = False) -> List[LoadedModel]:
        """The models a caller may use: all of them for a ``trusted`` one, else the public ones."""
        return [loaded for loaded in self.models if trusted or loaded.spec.public_api]

    def find(self, name: object, trusted: bool = True) -> LoadedModel:
        """The model a client named; None names the first. Non-public models need ``trusted``."""
        self._require_loaded()
        if name is None:
            loaded = next(iter(self._models.values()))
        else:
            try:
                loaded = self._by_name[name]
            except (KeyError, TypeError):
                raise UnknownModel(name, [spec.key for spec in self.specs
                                          if trusted or spec.public_api]) from None
        if not trusted and not loaded.spec.public_api:
            raise ModelNotPublic(f"Model {loaded.spec.key!r} is only served to this server's own chat page",
                                 param="model")
        return loaded

    def _require_loaded(self) -> None:
        if not self._models:
            raise NotReady("The server is still connecting to the swarm; try again shortly")

    async def close(self) -> None:
        """Disconnects every model from the swarm."""
        models, self._models, self._by_name = list(self._models.values()), {}, {}
        for loaded in models:
            try:
                await self.executor.run(loaded.close)
            except Exception:
                logger.exception("Error while disconnecting %s", loaded.spec.key)
