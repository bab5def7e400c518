"""``POST /api/v1/generate``: one generation per request, from a form, a query string or JSON."""

from contextlib import aclosing
from typing import Any, Dict

from handlers.base import GenerationHandler
from handlers.native_replies import GenerateResult
from handlers.protocol import generation_request, optional_str
from sessions.errors import BadRequest


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

    def form_hint(self) -> str:
        """Why a JSON body's fields were not read: it came without a JSON content type (curl's
        ``-d`` sends it as a form), so it was read as form fields."""
        content_type = self.request.headers.get("Content-Type", "")
        if not content_type.startswith("application/json") and self.request.body.lstrip().startswith(b"{"):
            return (f" (the body was read as form fields, since its Content-Type is {content_type or 'missing'}; "
                    "send a JSON body with Content-Type: application/json)")
        return ""

    async def post(self) -> None:
        params = self.request_params()
        try:
            request = generation_request(params, allow_stop_sequence=False)
        except BadRequest as error:
            raise BadRequest(f"{error}{self.form_hint()}") from None
        model = optional_str(params, "model", allow_empty=False)
        outputs, route = [], None
        loaded = self.manager.find_model(model, self.client, trusted=False)
        async with aclosing(self.generate(loaded, request)) as updates:
            async for update in updates:
                outputs.append(update.outputs)
                route = update.route
        self.write(GenerateResult("".join(outputs), route).body())
