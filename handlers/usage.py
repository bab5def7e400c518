"""``GET /api/v1/usage``: a key's own limits, what is left of them and what it used today."""

from handlers.base import APIHandler
from handlers.native_replies import AccountUsage


class UsageHandler(APIHandler):
    """Answers the caller about its own account only (anonymous clients: their address's)."""

    requires_api_key = True

    def get(self) -> None:
        caller = self.caller
        self.write(AccountUsage.of(caller.account, self.manager.admission.session_limit(caller.client)).body())
