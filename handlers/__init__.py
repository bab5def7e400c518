"""The HTTP and WebSocket side: handlers parse requests, call the session manager, and reply."""
