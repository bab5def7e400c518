"""``GET /api/v1/swarm``: the swarm map, each model's servers and whether it has a full route."""

from handlers.base import APIHandler


class SwarmHandler(APIHandler):
    """Which peers serve which blocks of every model, with their announced throughput, and how
    fast each server has answered this server's recent steps."""

    async def get(self) -> None:
        routes = await self.manager.monitor.routes()
        self.write({"ok": True, "models": [route.describe() for route in routes],
                    "server_latency": self.manager.server_latency.describe()})
