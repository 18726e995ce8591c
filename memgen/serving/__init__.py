"""``memgen serve``: an OpenAI-compatible HTTP server over the continuous-batching engine.

The API surface follows vLLM's OpenAI server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``, ``/metrics``); memory settings travel in one extension object,
``"memgen": {...}``, in requests and responses. FastAPI and uvicorn come from the ``serve`` extra.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
