"""The model families this server serves: their configs, the block our nodes run for them, their
RoPE scalings, their registration with transformers and petals, and the refusal of any other."""

from swarm.families.support import UnsupportedModel, check_servable, supported_families

__all__ = ["UnsupportedModel", "check_servable", "supported_families"]
