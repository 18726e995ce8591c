"""The server's settings: one dataclass for the CLI flags, YAML and Python."""

from __future__ import annotations

from dataclasses import dataclass

from ..dataclass_cli import help_field
from ..experience.weaving import RetrievalFields


@dataclass
class ServeConfig(RetrievalFields):
    """Options of ``memgen serve`` (the model flags --model/--adapter/--gguf-file/--base-dtype come separately)."""

    host: str = help_field("127.0.0.1", "address to bind (loopback unless told otherwise)")
    port: int = help_field(8000, "TCP port", ge=0)
    served_model_name: str = help_field("", "model name the API reports and accepts (default: the --model path's name)")
    api_key: str = help_field("", "require 'Authorization: Bearer KEY' on /v1 routes (empty: no auth)")
    max_rows: int = help_field(16, "most rows decoding at once (a request with n choices takes n)", ge=1)
    max_queue: int = help_field(64, "most requests waiting for rows; more get 429", ge=0)
    prefill_chunk: int = help_field(256, "prompt tokens prefilled per engine step", ge=1)
    max_prompt_tokens: int = help_field(
        0, "longest prompt accepted, in tokens (0: the model's context); longer get 413", ge=0
    )
    max_model_len: int = help_field(0, "prompt plus completion limit in positions (0: the model's context)", ge=0)
    max_n: int = help_field(8, "most choices (n) per request", ge=1)
    max_body_bytes: int = help_field(4_000_000, "largest request body accepted; larger get 413", ge=1)
    memory: str = help_field("trigger", "memory policy of requests that do not set memgen.memory")
    max_insertions: int = help_field(8, "insertion cap of requests that do not set memgen.max_insertions", ge=0)
    trigger_threshold: float = help_field(0.5, "trigger threshold of requests that do not set one", ge=0)
    experience: str | None = help_field(
        None, "experience store the weaver reads at every insertion (retrieval-augmented weaving, paper App. E)"
    )
    log_level: str = help_field("warning", "uvicorn log level")
