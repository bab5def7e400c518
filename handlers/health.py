"""``GET /health`` (the process answers) and ``GET /ready`` (every model can run now)."""

import time

from handlers.base import APIHandler
from handlers.native_replies import Health, Readiness
from sessions.errors import NotReady


class HealthHandler(APIHandler):
    """Liveness: answers as long as the event loop runs, whatever the swarm's state."""

    def get(self) -> None:
        self.write(Health("alive", self.manager.open_session_count).body())


class ReadyHandler(APIHandler):
    """Readiness: 200 when every model has a full route through the swarm and the generation
    executor keeps up (no more calls waiting than it has threads), else 503 saying why."""

    async def get(self) -> None:
        started = time.monotonic()
        try:
            routes = await self.manager.monitor.routes()
        except NotReady as error:
            self.set_status(503)
            self.write(Readiness(False, [], traceback=str(error)).body())
            return
        models = [route.describe(with_servers=False) for route in routes]
        executor = self.manager.executor
        ready = all(route.full_route for route in routes) and not executor.saturated
        if not ready:
            self.set_status(503)
            self.set_header("Retry-After", "5")
        load = {"threads": executor.workers, "waiting_calls": executor.queue_depth, "saturated": executor.saturated}
        self.write(Readiness(ready, models, executor=load,
                             checked_in_ms=round(1000 * (time.monotonic() - started), 1)).body())
