"""``GET /api/v1/swarm``: the swarm map, each model's servers and whether it has a full route."""

import dataclasses

from handlers.base import APIHandler


class SwarmHandler(APIHandler):
    """Which peers serve which blocks of every model, with their announced throughput."""

    async def get(self) -> None:
        routes = await self.manager.swarm_state()
        self.write({"ok": True, "models": [{
            "model": route.model,
            "num_blocks": route.num_blocks,
            "full_route": route.full_route,
            "missing_blocks": list(route.missing_blocks),
            "servers": [dataclasses.asdict(server) for server in route.servers],
            "error": route.error,
        } for route in routes]})
