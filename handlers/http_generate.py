"""``POST /api/v1/generate``: one generation per request, from a form, a query string or JSON."""

import json
import uuid
from typing import Any, Dict

from handlers.base import APIHandler
from handlers.protocol import ProtocolError, generation_request, optional_str


class GenerateHandler(APIHandler):
    """Runs one generation in a session of its own and answers ``{"ok": true, "outputs": ...}``."""

    def prepare(self) -> None:
        self.connection_id = "http-" + uuid.uuid4().hex[:8]

    def request_params(self) -> Dict[str, Any]:
        """Parameters from the query string and a form body, or from a JSON object body."""
        params: Dict[str, Any] = {name: self.get_argument(name) for name in self.request.arguments}
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            try:
                body = json.loads(self.request.body or b"{}")
            except ValueError as error:
                raise ProtocolError(f"Body is not valid JSON: {error}") from None
            if not isinstance(body, dict):
                raise ProtocolError("JSON body must be an object")
            params.update(body)
        return params

    async def post(self) -> None:
        params = self.request_params()
        request = generation_request(params, allow_stop_sequence=False)
        model = optional_str(params, "model", allow_empty=False) or self.manager.specs[0].key
        outputs = []
        async for update in self.manager.one_shot(self.connection_id, model, request):
            outputs.append(update.outputs)
        self.write({"ok": True, "outputs": "".join(outputs)})

    def on_connection_close(self) -> None:
        # The client went away mid-request: stop generating for nobody.
        self.manager.close_connection(self.connection_id, "client disconnected")
