"""What the server observes: metrics, the swarm's state, its servers' latency, connection logs."""
