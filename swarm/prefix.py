"""The DHT prefix of a model: the name its blocks are announced under in the swarm."""

from pathlib import PurePosixPath

# What petals' servers append to a repository's name (its Llama 2 checkpoints were named so).
PETALS_SUFFIX = "-hf"


def dht_prefix_for(source: str) -> str:
    """The prefix of a model named ``source`` (a hub repository or a local folder), as petals'
    own servers derive it: the last part of the name, its dots turned into dashes (a dot
    separates a prefix from a block's number), "-hf" appended unless it ends so. The embedded
    nodes, ``python -m swarm serve`` and the clients all use this one rule, so that they meet in
    the swarm, and a folder named after a repository meets that repository's public servers."""
    name = PurePosixPath(source.rstrip("/")).name.replace(".", "-")
    return name if name.endswith(PETALS_SUFFIX) else name + PETALS_SUFFIX
