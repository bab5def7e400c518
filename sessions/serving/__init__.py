"""The serving policy around sessions: admission and limits, the model registry, the session
manager, warm sessions for prefix reuse and resumable WebSocket sessions."""
