"""Typed configs: the model's architecture (:class:`MemGenConfig`) and one generation call's options
(:class:`GenerateConfig`), plus the parsed insertion policy (:class:`MemoryPolicy`).

Departures from the paper, and why:
- The paper inserts latents at every delimiter the trigger approves with no bound; we add a
  per-sequence cap (``max_insertions``) because unbounded insertion makes decode cost and
  cache size unbounded, and the sparsity analysis in the paper shows few insertions matter.
- The projection starts as the identity (the weaver's hidden state lands where the reasoner's
  own last-layer states live) and latents are rescaled to the mean norm of the reasoner's
  input-token embeddings, so freshly initialised memory looks like ordinary token input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .dataclass_cli import check_ranges, help_field
from .errors import ConfigError

MEMORY_POLICIES = ("off", "always", "trigger", "random:P")


@dataclass
class MemGenConfig:
    """Architecture of the weaver and trigger attached to a frozen reasoner."""

    prompt_latents: int = help_field(8, "K: latent vectors woven at the prompt end", ge=1)
    inference_latents: int = help_field(8, "K: latent vectors woven at an in-reasoning delimiter", ge=1)
    delimiters: list[str] = help_field([",", ".", "\n"], "characters that end a delimiter token (insertion points)")
    lora_r: int = help_field(16, "LoRA rank of the weaver adapter", ge=1)
    lora_alpha: int = help_field(32, "LoRA alpha of the weaver adapter", gt=0)
    lora_dropout: float = help_field(0.0, "LoRA dropout of the weaver adapter", ge=0, lt=1)
    lora_target_modules: list[str] = help_field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "reasoner linear layers that carry the weaver LoRA (['all-linear']: every linear layer but the head)",
    )
    trigger_hidden: int = help_field(128, "hidden width of the trigger MLP (0: a linear head)", ge=0)
    trigger_init_prob: float = help_field(0.5, "P(invoke) of the untrained trigger", gt=0, lt=1)
    trigger_at_prompt_end: bool = help_field(
        False,
        "the prompt-end insertion is a trigger decision too (read at "
        "the last prompt token; under memory trigger or random:P), so "
        "the trigger can leave a whole answer unwoven; off: always woven",
    )
    weaver: str = help_field("lora", "weaver kind: 'lora' (LoRA on the reasoner, active only on query slots)")
    anchor_context: bool = help_field(
        True,
        "add a learned linear map of the reasoner's state at the insertion "
        "point to every latent (a direct path for context)",
    )
    latent_init_text: str | None = help_field(
        None,
        "start each latent at the embedding of this text's tokens (cycled over the K slots), like "
        "PEFT prompt tuning's TEXT init ('a|b' averages the alternatives slot by slot); the context paths "
        "then start at zero",
    )
    latent_positions: str = help_field(
        "advance",
        "advance: latents take the next K positions (paper); tied: latents share the preceding token's position",
    )

    def __post_init__(self) -> None:
        if isinstance(self.delimiters, str):
            self.delimiters = list(self.delimiters)
        self.delimiters = list(self.delimiters)
        self.lora_target_modules = list(self.lora_target_modules)
        for name in ("prompt_latents", "inference_latents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{name} (K) must be a positive integer, got {value!r}; "
                    "use memory policy 'off' to generate without latents"
                )
        check_ranges(self)
        if not self.delimiters or any(not isinstance(d, str) or len(d) != 1 for d in self.delimiters):
            raise ConfigError(f"delimiters must be a non-empty list of single characters, got {self.delimiters!r}")
        if self.latent_positions not in ("advance", "tied"):
            raise ConfigError(f"latent_positions must be 'advance' or 'tied', got {self.latent_positions!r}")
        if self.latent_init_text is not None and not self.latent_init_text:
            raise ConfigError("latent_init_text must be non-empty text, or None for the default initialisation")
        if self.weaver != "lora":
            raise ConfigError(f"unknown weaver kind {self.weaver!r}; available: ['lora']")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryPolicy:
    """Where latents are inserted: ``off``, ``always``, ``trigger`` (the learned head) or ``random`` with rate ``p``."""

    kind: str
    p: float = 0.0

    @classmethod
    def parse(cls, text: str | MemoryPolicy) -> MemoryPolicy:
        if isinstance(text, MemoryPolicy):
            return text
        raw = str(text).strip().lower()
        if raw in ("off", "always", "trigger"):
            return cls(raw)
        if raw.startswith("random:"):
            try:
                p = float(raw.split(":", 1)[1])
            except ValueError:
                p = -1.0
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"memory policy {text!r}: random:P needs 0 <= P <= 1")
            return cls("random", p)
        raise ConfigError(f"unknown memory policy {text!r}; choose one of {list(MEMORY_POLICIES)}")

    def __str__(self) -> str:
        return f"random:{self.p:g}" if self.kind == "random" else self.kind


@dataclass
class GenerateConfig:
    """Options of one generation call."""

    max_new_tokens: int = help_field(128, "most tokens generated per row", ge=1)
    do_sample: bool = help_field(False, "sample instead of greedy decoding")
    temperature: float = help_field(1.0, "softmax temperature when sampling", gt=0)
    top_k: int = help_field(0, "keep the k most likely tokens when sampling (0 = off)", ge=0)
    top_p: float = help_field(1.0, "nucleus sampling mass (1.0 = off)", gt=0, le=1)
    memory: str = help_field("trigger", "insertion policy: off | always | trigger | random:P")
    insert_at_prompt_end: bool = help_field(True, "weave latents at the prompt end (unless memory is off)")
    max_insertions: int = help_field(8, "cap on in-reasoning insertions per row (prompt end not counted)", ge=0)
    trigger_threshold: float = help_field(
        0.5,
        "insert when P(invoke) >= this (memory=trigger, no sampling); above 1 never inserts but still logs P(invoke)",
        ge=0,
    )
    sample_trigger: bool = help_field(False, "draw trigger decisions as Bernoulli(P(invoke)) instead of thresholding")
    stop: list[str] = help_field([], "stop strings; a row ends once its text contains one")
    ignore_eos: bool = help_field(False, "keep generating past EOS (benchmarks)")
    num_samples: int = help_field(1, "samples per prompt; the prompt is prefilled once and its cache shared", ge=1)
    seed: int | None = help_field(None, "seed for token sampling and trigger decisions", ge=0)
    return_logprobs: bool = help_field(
        False, "return log-probs of the chosen tokens (temperature-scaled, before top-k/top-p)"
    )
    return_latents: bool = help_field(False, "keep the woven latent vectors in the insertion log")
    output_logits: bool = help_field(False, "return every step's raw logits (debugging and equivalence tests)")
    compact_after: int = help_field(64, "compact the KV cache once this many masked pad slots have accumulated", ge=0)

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.policy = MemoryPolicy.parse(self.memory)
        check_ranges(self)
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
