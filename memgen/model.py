"""``MemGen``: a frozen Hugging Face causal LM plus a memory weaver and a memory trigger.

One copy of the base weights carries everything: the weaver's LoRA is injected into the
reasoner's own linear layers and switched on only for the weaver's query slots, and the
trigger reads hidden states the reasoner computes anyway. Generation lives in
:mod:`memgen.engine`, the batched teacher-forced forward in :mod:`memgen.teacher_forcing`;
this module owns construction, parameter groups, the shared "weave and feed" step and
save/load with base-model checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import atomic_directory, weights_fingerprint
from .config import GenerateConfig, MemGenConfig
from .delimiters import delimiter_mask, delimiter_token_ids
from .errors import AdapterError, InputError
from .reasoner import Reasoner, append_rows_slots, select_rows
from .trigger import TRIGGER_STATS, TriggerHead
from .version import __version__
from .weaver import LoraQueryWeaver

CONFIG_FILE = "memgen_config.json"
MODULES_FILE = "memgen_modules.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def _base_signature(model) -> dict:
    config = model.config.get_text_config(decoder=True)
    return {
        "model_type": getattr(model.config, "model_type", None),
        "architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "num_hidden_layers": int(getattr(config, "num_hidden_layers", 0)),
    }


class MemGen(nn.Module):
    """A reasoner with generative latent memory.

    Args:
        reasoner: any ``AutoModelForCausalLM`` (frozen here: ``requires_grad=False``).
        tokenizer: its tokenizer (delimiters are read from its vocabulary once).
        config: weaver / trigger architecture.
    """

    def __init__(self, reasoner, tokenizer, config: MemGenConfig | None = None) -> None:
        super().__init__()
        if any(isinstance(m, LoraLayer) for m in reasoner.modules()):
            raise AdapterError(
                "this base model carries peft LoRA layers; pass the plain base model "
                "(merge or unload other adapters first)"
            )
        self.config = config or MemGenConfig()
        self.tokenizer = tokenizer
        reasoner.requires_grad_(False)
        reasoner.eval()
        self.base_signature = _base_signature(reasoner)
        self.base_fingerprint = weights_fingerprint(reasoner)
        self.reasoner_model = reasoner
        self.reasoner = Reasoner(reasoner)
        self.weaver = LoraQueryWeaver(self.reasoner, self.config).to(self.reasoner.device)
        if self.config.latent_init_text:
            self.weaver.init_from_embeddings(self._init_embeddings(self.config.latent_init_text))
        self.trigger = self._new_trigger_head()
        # The last prompt token's state is unlike a delimiter's, and the two decisions pay off differently
        # (measured on the demo: one shared head learned the same prompt-end probability for prompts where
        # memory helps and where it hurts), so the prompt-end decision gets its own head.
        self.prompt_trigger = self._new_trigger_head() if self.config.trigger_at_prompt_end else None
        self.delimiter_ids = delimiter_token_ids(tokenizer, self.config.delimiters)
        lookup_size = max(self.reasoner.vocab_size, len(tokenizer))
        self.register_buffer(
            "delimiter_lookup",
            delimiter_mask(self.delimiter_ids, lookup_size).to(self.reasoner.device),
            persistent=False,
        )

    # ----------------------------------------------------------------- parameters
    def weaver_parameters(self) -> list[nn.Parameter]:
        """LoRA, queries and projection: what weaver SFT / GRPO train."""
        return self.weaver.trainable_parameters()

    def trigger_parameters(self) -> list[nn.Parameter]:
        return [p for head in self.trigger_heads() for p in head.parameters()]

    def trigger_heads(self) -> list[TriggerHead]:
        """The delimiter head, then the prompt-end head where ``trigger_at_prompt_end`` made one."""
        return [self.trigger] + ([self.prompt_trigger] if self.prompt_trigger is not None else [])

    def decision_head(self, prompt_end: bool) -> TriggerHead:
        """The head that decides an insertion at the prompt end (``prompt_end``) or at a delimiter."""
        return self.prompt_trigger if prompt_end and self.prompt_trigger is not None else self.trigger

    def _new_trigger_head(self) -> TriggerHead:
        return TriggerHead(self.reasoner.hidden_size, self.config.trigger_hidden, self.config.trigger_init_prob).to(
            self.reasoner.device
        )

    def reasoner_parameters(self) -> list[nn.Parameter]:
        return list(self.reasoner_model.parameters())

    def train(self, mode: bool = True) -> MemGen:
        super().train(mode)
        # The reasoner stays in eval mode (frozen); only the weaver's LoRA dropout follows `mode`.
        self.reasoner_model.eval()
        for module in self.weaver.lora_dropout_modules():
            module.train(mode)
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the reasoner's decoder layers in the backward pass instead of keeping their activations.

        Training then stores one layer's inputs per layer and sequence, not every intermediate activation,
        for about one more forward pass (:mod:`memgen.checkpointing`). Decoding is unaffected.
        """
        from .checkpointing import set_enabled

        set_enabled(self.reasoner.backbone, True, self._lora_swap())

    def gradient_checkpointing_disable(self) -> None:
        from .checkpointing import set_enabled

        set_enabled(self.reasoner.backbone, False, self._lora_swap())

    def _lora_swap(self):
        return (lambda: self.weaver.lora_is_installed, self.weaver.set_lora_installed)

    @property
    def is_gradient_checkpointing(self) -> bool:
        from .checkpointing import is_enabled

        return is_enabled(self.reasoner.backbone)

    @property
    def device(self) -> torch.device:
        return self.reasoner.device

    # ----------------------------------------------------------------- shared step
    def weave_and_feed(
        self,
        cache,
        attention_mask: torch.Tensor,
        next_positions: torch.Tensor,
        rows: torch.Tensor,
        kind: str,
        anchor: torch.Tensor,
        allow_subset: bool = False,
        context=None,
        gate=None,
    ):
        """Weave latents for ``rows`` and append them to the cache (masked pad slots for other rows).

        ``anchor`` (B, d) is each row's reasoner state at the insertion point (the last fed token);
        ``context`` is None or (token ids (B, S), valid (B, S)), retrieved text only the weaver reads;
        ``gate(latents (B, K, d), rows (B,)) -> (B,) bool``, when given, picks which woven rows are fed:
        the others get masked pad slots, exactly as rows that did not insert (an insertion filter).

        Returns (latents (B, K, d), reasoner hidden states of the latent slots (B, K, d),
        the grown attention mask, the advanced next positions, the rows fed). With ``allow_subset``
        and at most half the rows inserting, the 2K-slot forwards run on those rows only (their
        cache rows are copied out and the new slots copied back), instead of on the whole batch.
        """
        if allow_subset:
            index = rows.nonzero().squeeze(1)
            if 0 < index.numel() <= rows.numel() // 2:
                return self._weave_and_feed_rows(
                    cache, attention_mask, next_positions, rows, index, kind, anchor, context, gate
                )
        k = self.weaver.num_latents(kind)
        positions, advanced = self.latent_positions(next_positions, rows, k)
        latents = self.weaver.weave(self.reasoner, cache, attention_mask, positions, rows, kind, anchor, context)
        if gate is not None:
            rows = rows & gate(latents, rows)
            _, advanced = self.latent_positions(next_positions, rows, k)  # withheld rows do not advance
        slots = rows.to(attention_mask.dtype)[:, None].expand(-1, k)
        mask = torch.cat([attention_mask, slots], dim=1)
        hidden = self.reasoner.hidden(inputs_embeds=latents, attention_mask=mask, position_ids=positions, cache=cache)
        return latents, hidden, mask, advanced, rows

    def latent_positions(self, next_positions: torch.Tensor, rows: torch.Tensor, k: int):
        """Position ids of K latents for each row, and each row's next text position after them.

        ``advance`` (the paper): latents take the next K positions and the text continues
        after them. ``tied``: all K latents take the position of the token they follow and
        the text continues where it would have without memory, so distances between real
        tokens are unchanged (position-sensitive small reasoners are disturbed far less).
        """
        if self.config.latent_positions == "tied":
            return (next_positions - 1).clamp_min(0)[:, None].expand(-1, k).contiguous(), next_positions
        positions = next_positions[:, None] + torch.arange(k, device=next_positions.device)
        return positions, next_positions + k * rows.long()

    def _weave_and_feed_rows(self, cache, attention_mask, next_positions, rows, index, kind, anchor, context, gate):
        sub_cache = select_rows(cache, index, self.reasoner)
        sub_mask, sub_pos = attention_mask.index_select(0, index), next_positions.index_select(0, index)
        sub_rows = torch.ones(index.numel(), dtype=torch.bool, device=rows.device)
        sub_context = None if context is None else tuple(t.index_select(0, index) for t in context)
        latents, hidden, _, _, sub_fed = self.weave_and_feed(
            sub_cache, sub_mask, sub_pos, sub_rows, kind, anchor.index_select(0, index), context=sub_context, gate=gate
        )
        k = latents.shape[1]
        append_rows_slots(cache, sub_cache, index, k)
        batch = rows.numel()
        full_latents = latents.new_zeros(batch, k, latents.shape[2]).index_copy(0, index, latents)
        full_hidden = hidden.new_zeros(batch, k, hidden.shape[2]).index_copy(0, index, hidden)
        fed = torch.zeros_like(rows).index_copy(0, index, sub_fed)
        slots = fed.to(attention_mask.dtype)[:, None].expand(-1, k)
        _, advanced = self.latent_positions(next_positions, fed, k)
        return full_latents, full_hidden, torch.cat([attention_mask, slots], dim=1), advanced, fed

    def _init_embeddings(self, text: str) -> torch.Tensor:
        """Token embeddings of ``text``; ``a|b`` averages the alternatives slot by slot.

        An average sits between readings the reasoner knows (a sign-free note), so the first
        SFT gradients say which way each row should go; a made-up filler can instead be a
        point where the reasoner ignores the slot altogether.
        """
        tables = []
        for alternative in text.split("|"):
            ids = self.tokenizer(alternative, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InputError(f"latent_init_text {text!r}: {alternative!r} encodes to no tokens")
            tables.append(self.reasoner.embed(torch.tensor(ids, device=self.device)).detach())
        if len({t.shape[0] for t in tables}) > 1:
            raise InputError(
                f"latent_init_text {text!r}: the alternatives between '|' must encode to the same "
                f"number of tokens, got {[t.shape[0] for t in tables]}"
            )
        return torch.stack(tables).mean(dim=0)

    # ----------------------------------------------------------------- tokenization
    def encode_prompts(self, prompts) -> list[list[int]]:
        """Accept a string, a list of strings, or lists of token ids; refuse empty prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("no prompts given: pass a string, a list of strings or a list of token-id lists")
        encoded = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt)["input_ids"] if prompt else []
            elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
                ids = list(prompt)
            else:
                raise InputError(f"prompt {i} is a {type(prompt).__name__}; expected a string or a list of token ids")
            if not ids:
                raise InputError(f"prompt {i} is empty; memgen needs at least one prompt token to condition on")
            bad = [t for t in ids if not 0 <= t < self.reasoner.vocab_size]
            if bad:
                raise InputError(
                    f"prompt {i} has token ids {bad[:5]} outside the model's vocabulary of {self.reasoner.vocab_size}"
                )
            encoded.append(ids)
        return encoded

    def delimiter_positions(self, completion_ids: list[int], prompt_end: bool = True) -> list[int]:
        """Insertion positions at every delimiter of a completion (and the prompt end), for SFT.

        Position ``i + 1`` follows delimiter token ``i``; the last token is excluded because
        nothing after it is predicted.
        """
        lookup = self.delimiter_lookup
        points = [i + 1 for i, t in enumerate(completion_ids[:-1]) if t < lookup.numel() and bool(lookup[t])]
        return ([0] if prompt_end else []) + points

    # ----------------------------------------------------------------- public API
    def generate(
        self,
        prompts,
        config: GenerateConfig | None = None,
        on_token=None,
        experience=None,
        insertion_filter=None,
        **overrides,
    ):
        """Batched generation with latent memory. Returns :class:`memgen.engine.GenerationOutput`.

        ``overrides`` are :class:`GenerateConfig` fields; ``on_token(event)`` is called for
        every generated token with a :class:`memgen.engine.TokenEvent`. ``experience`` (a
        :class:`memgen.experience.ExperienceReader`) makes every invocation retrieve text the
        weaver reads (paper App. E). ``insertion_filter(latents (n, K, d), kind) -> (n,) bool``
        sees every woven insertion and returns which to feed; a withheld one leaves its row as if
        it had not inserted (masked pad slots) and is logged with ``suppressed=True``
        (:mod:`memgen.analysis` ablates latent clusters with it).
        """
        from .engine import DecodeSession

        session = DecodeSession(
            self,
            self.encode_prompts(prompts),
            _merge(config, overrides),
            stream_text=on_token is not None,
            experience=experience,
            insertion_filter=insertion_filter,
        )
        for event in session:
            if on_token is not None:
                on_token(event)
        return session.output

    def stream(self, prompts, config: GenerateConfig | None = None, experience=None, **overrides) -> Iterator:
        """Yield :class:`memgen.engine.TokenEvent` per generated token; the generator returns the output."""
        from .engine import DecodeSession

        session = DecodeSession(
            self, self.encode_prompts(prompts), _merge(config, overrides), stream_text=True, experience=experience
        )
        yield from session
        return session.output

    def teacher_forced(
        self, prompt_ids, completion_ids, insertions, temperature: float = 1.0, contexts=None, kinds=None
    ):
        """Batched log-probs of completions with latents spliced at ``insertions``; see :mod:`memgen.teacher_forcing`.

        ``contexts`` (per row, one token-id list per insertion) is the retrieved text each weaver pass
        reads, e.g. a rollout's ``Completion.insertion_contexts``. ``kinds`` (per row, ``"prompt"`` or
        ``"inference"`` per insertion) places prompt-query insertions past position 0, as agent episodes do.
        """
        from .teacher_forcing import teacher_forced_forward

        return teacher_forced_forward(self, prompt_ids, completion_ids, insertions, temperature, contexts, kinds)

    def forward(self, prompt_ids, completion_ids, insertions, temperature: float = 1.0, contexts=None, kinds=None):
        return self.teacher_forced(prompt_ids, completion_ids, insertions, temperature, contexts, kinds)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path, save_tokenizer: bool = True) -> Path:
        """Write the peft adapter, ``memgen_config.json`` and the extra modules (atomically)."""
        directory = Path(directory)
        lora_state = self.weaver.adapter_state_dict()
        modules = {f"weaver.{k}": v for k, v in self.weaver.state_dict().items() if not k.startswith("lora_layers.")}
        for prefix, head in self._named_heads():
            modules.update({f"{prefix}.{k}": v for k, v in head.state_dict().items()})
        meta = {
            "memgen_version": __version__,
            "config": self.config.to_dict(),
            "base": dict(self.base_signature, fingerprint=self.base_fingerprint),
        }
        with atomic_directory(directory) as scratch:
            self.weaver.lora_config.save_pretrained(str(scratch))
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in lora_state.items()}, str(scratch / ADAPTER_WEIGHTS_FILE)
            )
            save_file({k: v.detach().contiguous().cpu() for k, v in modules.items()}, str(scratch / MODULES_FILE))
            (scratch / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if save_tokenizer and self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(scratch))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model, tokenizer=None, **model_kwargs) -> MemGen:
        """Restore a saved MemGen onto ``base_model`` (a model or a path/hub name), refusing a mismatched base."""
        directory = Path(directory)
        meta = read_adapter_meta(directory)
        from .loading import load_base, load_tokenizer

        if isinstance(base_model, (str, Path)):
            base_model, base_tokenizer = load_base(base_model, **model_kwargs)
            tokenizer = tokenizer or base_tokenizer
        if tokenizer is None:
            tokenizer = load_tokenizer(directory)
        check_base_signature(meta["base"], _base_signature(base_model), directory)
        model = cls(base_model, tokenizer, MemGenConfig(**meta["config"]))
        model.load_adapter(directory)
        return model

    def load_adapter(self, directory: str | Path) -> None:
        """Load saved weaver and trigger weights into this model in place (same config and base)."""
        directory = Path(directory)
        meta = read_adapter_meta(directory)
        check_base_signature(meta["base"], self.base_signature, directory)
        # Fields added since the adapter was saved take their defaults, as in from_pretrained.
        if MemGenConfig(**meta["config"]).to_dict() != self.config.to_dict():
            raise AdapterError(
                f"adapter {directory} has a different MemGen config: {meta['config']} != {self.config.to_dict()}"
            )
        if self.base_fingerprint != meta["base"]["fingerprint"]:
            raise AdapterError(
                f"adapter {directory} was trained on different base weights "
                f"(weights fingerprint {meta['base']['fingerprint'][:12]}… != "
                f"{self.base_fingerprint[:12]}…); load the base model it was trained on"
            )
        lora_state = load_file(str(directory / ADAPTER_WEIGHTS_FILE), device=str(self.device))
        result = self.weaver.load_adapter_state_dict(lora_state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
        if unexpected or missing:
            raise AdapterError(
                f"adapter {directory} does not fit this model: unexpected {unexpected[:3]}, missing {missing[:3]}"
            )
        modules = load_file(str(directory / MODULES_FILE), device=str(self.device))
        incompatible = self.weaver.load_state_dict(
            {k[7:]: v for k, v in modules.items() if k.startswith("weaver.")}, strict=False
        )
        bad = list(incompatible.unexpected_keys) + [
            k for k in incompatible.missing_keys if not k.startswith("lora_layers.")
        ]
        if bad:
            raise AdapterError(f"{directory / MODULES_FILE} does not fit this MemGen config: {bad[:4]}")
        for prefix, head in self._named_heads():
            start = len(prefix) + 1
            incompatible = head.load_state_dict(
                {k[start:]: v for k, v in modules.items() if k.startswith(prefix + ".")}, strict=False
            )
            # Adapters saved before the head standardised its input lack the statistics: they keep the identity.
            bad = list(incompatible.unexpected_keys) + [k for k in incompatible.missing_keys if k not in TRIGGER_STATS]
            if bad:
                raise AdapterError(f"{directory / MODULES_FILE} does not fit this MemGen's {prefix} head: {bad[:4]}")

    def _named_heads(self) -> list[tuple[str, TriggerHead]]:
        return list(zip(("trigger", "prompt_trigger"), self.trigger_heads()))


def read_adapter_meta(directory: Path) -> dict:
    if not directory.exists():
        raise AdapterError(f"adapter directory {directory} does not exist")
    if not directory.is_dir():
        raise AdapterError(f"adapter path {directory} is not a directory")
    missing = [f for f in (CONFIG_FILE, MODULES_FILE, ADAPTER_WEIGHTS_FILE) if not (directory / f).is_file()]
    if missing:
        raise AdapterError(
            f"{directory} is not a memgen adapter: missing {missing} (write one with MemGen.save_pretrained)"
        )
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        meta["config"], meta["base"]["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AdapterError(f"{directory / CONFIG_FILE} is malformed: {exc}") from None
    return meta


def check_base_signature(saved: dict, actual: dict, directory: Path) -> None:
    reasons = []
    for key in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers"):
        if saved.get(key) != actual.get(key):
            reasons.append(f"{key}: adapter expects {saved.get(key)!r}, base has {actual.get(key)!r}")
    if saved.get("architectures") and saved["architectures"] != actual["architectures"]:
        reasons.append(f"architecture: adapter expects {saved['architectures']}, base is {actual['architectures']}")
    if reasons:
        raise AdapterError(f"adapter {directory} does not match this base model: " + "; ".join(reasons))


def _merge(config: GenerateConfig | None, overrides: dict) -> GenerateConfig:
    from dataclasses import fields, replace

    valid = {f.name for f in fields(GenerateConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise InputError(f"unknown generation option(s) {unknown}; valid: {sorted(valid)}")
    if config is None:
        return GenerateConfig(**overrides)
    return replace(config, **overrides) if overrides else config
