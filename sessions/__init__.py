"""The Petals side of the server: loaded models, inference sessions and the executor they run in.

- ``engine/`` runs one generation on one swarm session;
- ``serving/`` is the policy around sessions (admission, the manager, warm and resumable sessions);
- ``observe/`` holds what the server measures and logs;
- ``formats/`` holds chat formats, templates and tool-call syntax;
- ``requests``, ``request_rules``, ``models`` and ``errors`` are the vocabulary all of them share.

Nothing here imports Tornado; failures are raised as ``sessions.errors`` types that the
handlers turn into wire replies.
"""
