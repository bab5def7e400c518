"""``POST /api/v1/generate``: one generation per request, from a form, a query string or JSON."""

from contextlib import aclosing
from typing import Any, Dict

from handlers.base import GenerationHandler
from handlers.protocol import generation_request, optional_str


class GenerateHandler(GenerationHandler):
    """Runs one generation in a session of its own and answers ``{"ok": true, "outputs": ...}``."""

    def request_params(self) -> Dict[str, Any]:
        """Parameters from the query string and a form body, or from a JSON object body."""
        self.request_body()
        # Values as sent: a prompt's leading or trailing whitespace is part of it.
        params: Dict[str, Any] = {name: self.get_argument(name, strip=False) for name in self.request.arguments}
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            params.update(self.json_body())
        return params

    async def post(self) -> None:
        params = self.request_params()
        request = generation_request(params, allow_stop_sequence=False)
        model = optional_str(params, "model", allow_empty=False)
        outputs, route = [], None
        async with aclosing(self.generate(model, request)) as updates:
            async for update in updates:
                outputs.append(update.outputs)
                route = update.route
        reply = {"ok": True, "outputs": "".join(outputs)}
        if route is not None:
            reply["route"] = route
        self.write(reply)
