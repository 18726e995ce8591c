"""memgen: generative latent memory (memory weaver + memory trigger) for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .config import GenerateConfig, MemGenConfig, MemoryPolicy  # noqa: E402
from .errors import AdapterError, ConfigError, InputError, MemGenError  # noqa: E402
from .model import MemGen  # noqa: E402

__all__ = ["MemGen", "MemGenConfig", "GenerateConfig", "MemoryPolicy", "MemGenError", "AdapterError",
           "ConfigError", "InputError", "__version__"]
