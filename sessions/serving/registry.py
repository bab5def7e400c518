"""The model registry: the served models, loaded once, looked up by name, with their access policy,
and the declared models start-up refused, with why."""

import logging
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

from config import Settings
from model_specs import ModelSpec
from sessions.engine.executor import BlockingExecutor
from sessions.errors import ModelNotPublic, ModelUnavailable, NotReady, UnknownModel
from sessions.models import LoadedModel, load_model

logger = logging.getLogger(__name__)


class RefusedModel(NamedTuple):
    """A declared model this server cannot serve, and why (``UnsupportedModel``'s message)."""

    spec: ModelSpec
    reason: str


class ModelRegistry:
    """Loads every declared model's client (in the executor), finds models, disconnects them.

    A model is named by its repository (or adapter) or one of its aliases; no name means the
    first served model. Models declared ``public_api: false`` are served only to callers the
    handler vouches for (the server's own chat page). The ``refusals`` (a model's key: why it
    cannot be served) are never loaded: a request naming one is refused with that reason.
    """

    def __init__(self, specs: Sequence[ModelSpec], initial_peers: Sequence[str], device: str, torch_dtype: str,
                 settings: Settings, executor: BlockingExecutor,
                 refusals: Optional[Mapping[str, str]] = None):
        self.specs = tuple(specs)
        self.refused = {spec.key: RefusedModel(spec, refusals[spec.key]) for spec in self.specs
                        if refusals and spec.key in refusals}
        self._refused_by_name = {name: refused for refused in self.refused.values() for name in refused.spec.names()}
        self.initial_peers = list(initial_peers)
        self.device = device
        self.torch_dtype = torch_dtype
        self.settings = settings
        self.executor = executor
        self._models: Dict[str, LoadedModel] = {}
        self._by_name: Dict[str, LoadedModel] = {}

    async def load(self) -> None:
        """Connects the client of every declared model not refused to the swarm, in declaration order."""
        for spec in self.specs:
            if spec.key in self.refused:
                continue
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

    def declared(self) -> List[Union[LoadedModel, RefusedModel]]:
        """Every declared model, in declaration order: connected, or refused."""
        self._require_loaded()
        return [self._models.get(spec.key) or self.refused[spec.key] for spec in self.specs]

    def public_models(self, trusted: bool = False) -> List[LoadedModel]:
        """The models a caller may use: all of them for a ``trusted`` one, else the public ones."""
        return [loaded for loaded in self.models if trusted or loaded.spec.public_api]

    def find(self, name: object, trusted: bool = True) -> LoadedModel:
        """The model a client named; None names the first served. Non-public models need ``trusted``.
        A refused model's name is answered with why it is not served."""
        self._require_loaded()
        if name is None:
            loaded = next(iter(self._models.values()))
        else:
            loaded = self._by_name.get(name) if isinstance(name, str) else None
            if loaded is None:
                self._refuse_if_declared(name)
                raise UnknownModel(name, [model.spec.key for model in self.public_models(trusted)])
        if not trusted and not loaded.spec.public_api:
            raise ModelNotPublic(f"Model {loaded.spec.key!r} is only served to this server's own chat page",
                                 param="model")
        return loaded

    def _refuse_if_declared(self, name: object) -> None:
        """Raises, naming the reason, if ``name`` selects a declared model that start-up refused."""
        refused = self._refused_by_name.get(name) if isinstance(name, str) else None
        if refused is not None:
            raise ModelUnavailable(f"Model {refused.spec.key!r} is declared but not available: {refused.reason}")

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
