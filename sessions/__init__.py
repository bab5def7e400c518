"""The Petals side of the server: loaded models, inference sessions and the executor they run in.

Nothing here imports Tornado; failures are raised as ``sessions.errors`` types that the
handlers turn into wire replies.
"""
