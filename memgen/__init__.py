"""memgen: generative latent memory (memory weaver + memory trigger) for Hugging Face causal LMs."""

from .config import GenerateConfig, MemGenConfig, MemoryPolicy
from .errors import AdapterError, ConfigError, InputError, MemGenError
from .model import MemGen
from .version import __version__

__all__ = [
    "MemGen",
    "MemGenConfig",
    "GenerateConfig",
    "MemoryPolicy",
    "MemGenError",
    "AdapterError",
    "ConfigError",
    "InputError",
    "__version__",
]
