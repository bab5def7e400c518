"""The Petals side that is not per-connection: compatibility layer, local swarm, node command."""
