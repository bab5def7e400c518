"""The session manager: owns the bounded executor, the loaded models, and every task it starts."""

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

from config import PUBLIC_SWARM, ModelSpec
from sessions.errors import NotReady, UnknownModel
from sessions.models import LoadedModel, load_model

logger = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_initial_peers(initial_peers: Sequence[str]) -> List[str]:
    """Expands the word ``public`` into the public swarm's bootstrap peers."""
    if list(initial_peers) == [PUBLIC_SWARM]:
        from petals.constants import PUBLIC_INITIAL_PEERS

        return list(PUBLIC_INITIAL_PEERS)
    return list(initial_peers)


class SessionManager:
    """Everything that talks to the swarm goes through here.

    Blocking Petals calls run in one bounded thread pool (``run_blocking``), never on the
    event loop. ``start`` connects every model; ``close`` tears everything down.
    """

    def __init__(
        self,
        models: Sequence[ModelSpec],
        initial_peers: Sequence[str],
        device: str,
        torch_dtype: str,
        executor_workers: int = 8,
        step_timeout: float = 300.0,
    ):
        self.specs = tuple(models)
        self.initial_peers = resolve_initial_peers(initial_peers)
        self.device = device
        self.torch_dtype = torch_dtype
        self.step_timeout = step_timeout
        self.executor = ThreadPoolExecutor(max_workers=executor_workers, thread_name_prefix="petals")
        self._models: Dict[str, LoadedModel] = {}
        self._by_name: Dict[str, LoadedModel] = {}

    async def run_blocking(self, function: Callable[..., T], *args, **kwargs) -> T:
        """Runs a blocking call in the bounded executor and awaits its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs))

    async def start(self) -> None:
        """Connects the client of every declared model to the swarm."""
        for spec in self.specs:
            loaded = await self.run_blocking(load_model, spec, self.initial_peers, self.device, self.torch_dtype)
            self._models[spec.key] = loaded
            for name in spec.names():
                self._by_name[name] = loaded

    @property
    def models(self) -> List[LoadedModel]:
        """Connected models, in declaration order."""
        return list(self._models.values())

    def find_model(self, name: Optional[str]) -> LoadedModel:
        """The model a client named by repository, adapter or alias."""
        if not self._models:
            raise NotReady("The server is still connecting to the swarm; try again shortly")
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownModel(name, list(self._models)) from None

    async def close(self) -> None:
        """Disconnects every model and stops the executor."""
        models, self._models, self._by_name = list(self._models.values()), {}, {}
        for loaded in models:
            try:
                await self.run_blocking(loaded.close)
            except Exception:
                logger.exception("Error while disconnecting %s", loaded.spec.key)
        self.executor.shutdown(wait=False, cancel_futures=True)
