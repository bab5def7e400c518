"""What every handler reads of the application, through one channel: typed properties over
Tornado's application settings, which ``server.app_settings`` fills (the server's ``Settings``,
the session manager, the open WebSocket connections, the stored responses, the trusted proxies' networks)."""

from typing import Any, Dict, Set

import tornado.websocket

from config import Settings
from handlers.auth import presented_key
from handlers.clients import client_key, parse_networks
from sessions.accounts.book import Caller
from sessions.serving.manager import SessionManager
from sessions.serving.response_store import ResponseStore


def context_settings(config: Settings, manager: SessionManager) -> Dict[str, Any]:
    """The application settings handlers read their context from (Tornado's own included)."""
    return dict(
        config=config,
        manager=manager,
        websockets=set(),
        responses=ResponseStore(config.response_store_limits),
        trusted_networks=parse_networks(config.trusted_proxies),
        debug=config.debug,
        serve_traceback=config.debug,
    )


class ServerContext:
    """Mixed into every handler of the app: its configuration and collaborators."""

    settings: Dict[str, Any]  # the application's, as Tornado's handlers have them

    @property
    def config(self) -> Settings:
        """The server's settings."""
        return self.settings["config"]

    @property
    def manager(self) -> SessionManager:
        """The session manager every API shares."""
        return self.settings["manager"]

    @property
    def responses(self) -> ResponseStore:
        """The responses ``/v1/responses`` stored, for ``GET`` and for the requests that continue them."""
        return self.settings["responses"]

    @property
    def open_websockets(self) -> Set[tornado.websocket.WebSocketHandler]:
        """The open WebSocket connections, which shutdown closes with a reason."""
        return self.settings["websockets"]

    def request_address(self) -> str:
        """The address this request comes from (see ``handlers.clients.client_key``)."""
        return client_key(self.request, self.settings["trusted_networks"], self.config.client_ip_header)

    def request_caller(self) -> Caller:
        """Whom this request counts against: its API key's client and account, or its address's;
        ``Unauthorized`` for a key this server does not know, or none where one is required."""
        return self.manager.accounts.identify(presented_key(self.request), self.request_address(),
                                              self.config.api_key, self.config.allow_anonymous)
