"""Exceptions memgen raises for bad input, so callers (and the CLI) can report them cleanly.

Every user-facing check raises a subclass of :class:`MemGenError` with a message that says
what was wrong and how to fix it, instead of letting a shape error surface from deep
inside torch.
"""


class MemGenError(ValueError):
    """Base class for errors caused by the caller's input or files."""


class ConfigError(MemGenError):
    """A configuration value is out of range or unknown."""


class InputError(MemGenError):
    """A prompt, completion or insertion list cannot be processed."""


class AdapterError(MemGenError):
    """An adapter directory is missing, incomplete or does not match its base model."""


class UnsupportedModelError(MemGenError):
    """The base model's architecture cannot carry spliced latents (e.g. sliding-window caches)."""


class QualityBarError(MemGenError):
    """A model trained by memgen (the demo's reasoner) ended below the quality bar it must reach."""
