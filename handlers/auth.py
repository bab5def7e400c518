"""Where a request may carry its API key (``sessions.accounts.book`` says whose it is).

Programs send ``Authorization: Bearer KEY``, or ``x-api-key: KEY`` as Anthropic's API has it
(the bearer header wins when a request brings both). A browser cannot set headers on a WebSocket, so
the chat page offers the key as a WebSocket subprotocol, ``swarm-chat.key.`` followed by the
key in unpadded base64url, next to the plain ``swarm-chat`` subprotocol that the server
selects.
"""

import base64
import binascii
from typing import Optional

import tornado.httputil

SUBPROTOCOL = "swarm-chat"
KEY_SUBPROTOCOL_PREFIX = SUBPROTOCOL + ".key."


def presented_key(request: tornado.httputil.HTTPServerRequest) -> Optional[str]:
    """The key a request brings, if any."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    api_key = request.headers.get("x-api-key", "").strip()
    if api_key:
        return api_key
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            encoded = protocol[len(KEY_SUBPROTOCOL_PREFIX):]
            try:
                padded = encoded + "=" * (-len(encoded) % 4)
                return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
            except (binascii.Error, ValueError):  # ValueError covers undecodable UTF-8
                return None
    return None

