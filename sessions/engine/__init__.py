"""The engine that runs one generation on one swarm session: steps in the bounded executor,
token choice, drafts and their verification, stops and positions.

It imports nothing from ``sessions.serving``: the policy around sessions builds on it.
"""
