"""``--model memgen``: lm-eval's ``hf`` model with generation and scoring under latent memory.

``MemGenLM`` subclasses lm-eval's ``HFLM``, so everything lm-eval does around the model (the
prompt, few-shot examples, chat template and system instruction, left truncation, batching,
``until`` and ``max_gen_toks``, answer extraction) is lm-eval's own code, and only two calls change:

- ``_model_generate`` decodes the batch through memgen's engine (``MemGen.generate``) with
  lm-eval's ``until`` as stop strings and ``max_gen_toks`` as the token limit. With
  ``memory=off`` it gives the ``hf`` backend's outputs sample for sample (``tests/test_harness.py``).
- ``_loglikelihood_tokens`` (behind ``loglikelihood`` and ``loglikelihood_rolling``) scores each
  continuation by forced decoding (:mod:`memgen.forced`), latents woven where the policy weaves
  them while reading it. With ``memory=off`` it is ``HFLM``'s own forward pass, so vanilla
  log-likelihoods are exactly lm-eval's.

``model_args``: ``pretrained`` (a directory, a hub name or a ``.gguf`` file), ``gguf_file``,
``adapter``, ``memory`` (off | always | trigger | random:P), ``trigger_threshold``,
``max_insertions``, ``insert_at_prompt_end``, ``dtype`` (float32 | bfloat16 | auto),
``batch_size``, ``max_length``, ``insertion_log`` (a JSONL path: one line per sample with its
insertions). Every sample's insertions are also counted in ``insertion_summary()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import GenerateConfig
from ..forced import score_continuations


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model("memgen")
class MemGenLM(HFLM):
    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        gguf_file: str | None = None,
        memory: str = "off",
        trigger_threshold: float = 0.5,
        max_insertions: int = 8,
        insert_at_prompt_end: bool = True,
        dtype: str = "float32",
        insertion_log: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        **kwargs,
    ) -> None:
        from ..loading import load_base
        from ..model import MemGen
        from ..precision import resolve_base_dtype

        torch_dtype, _ = resolve_base_dtype(str(dtype), "cpu")
        base, tokenizer = load_base(pretrained, gguf_file, dtype=torch_dtype)
        self.memgen = MemGen.from_pretrained(adapter, base, tokenizer) if adapter else MemGen(base, tokenizer)
        self.memgen.eval()
        self.memory_settings = dict(
            memory=str(memory),
            trigger_threshold=float(trigger_threshold),
            max_insertions=int(max_insertions),
            insert_at_prompt_end=_flag(insert_at_prompt_end),
        )
        self.memory_config = GenerateConfig(**self.memory_settings)  # refuses a bad policy before lm-eval starts
        self.insertion_log = Path(insertion_log) if insertion_log else None
        self.insertion_records: list[dict] = []
        kwargs.pop("device", None)  # the base stays where memgen loaded it
        super().__init__(
            pretrained=base,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            device=str(self.memgen.device),
            **kwargs,
        )

    @property
    def memory_off(self) -> bool:
        return self.memory_config.policy.kind == "off"

    # ------------------------------------------------------------------ generate_until
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        mask = generation_kwargs.pop("attention_mask", None)
        rows = context.tolist() if mask is None else [r[m.bool()].tolist() for r, m in zip(context, mask)]
        temperature = float(generation_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = bool(generation_kwargs.get("do_sample", False)) and temperature > 0
        config = GenerateConfig(
            max_new_tokens=max(1, max_length - context.shape[1]),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_p=float(generation_kwargs.get("top_p", 1.0) or 1.0),
            top_k=int(generation_kwargs.get("top_k", 0) or 0),
            stop=[s for s in stop if s],
            **self.memory_settings,
        )
        with torch.inference_mode():
            out = self.memgen.generate(rows, config)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        width = max(len(c.token_ids) for c in out.completions)
        full = []
        for row, completion in zip(context.tolist(), out.completions):
            tokens = completion.token_ids
            full.append(row + tokens + [pad] * (width - len(tokens)))
            self._record("generate_until", len(row), completion.insertions, completion.text)
        return torch.tensor(full, device=context.device)

    # ------------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.memory_off:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm import tqdm

        size = int(override_bs or (self.batch_size if str(self.batch_size) != "auto" else 8) or 1)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(
            range(0, len(order), size), disable=disable_tqdm or self.rank != 0, desc="memgen loglikelihood"
        ):
            batch = order[start : start + size]
            prompts, continuations = [], []
            for i in batch:
                _, context, continuation = requests[i]
                whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
                prompt = whole[: len(whole) - len(continuation)] or [self.prefix_token_id]
                prompts.append(prompt)
                continuations.append(list(continuation)[-len(whole) :])
            with torch.inference_mode():
                scores = score_continuations(self.memgen, prompts, continuations, self.memory_config)
            for i, prompt, score in zip(batch, prompts, scores):
                results[i] = (score.logprob, score.is_greedy)
                self._record("loglikelihood", len(prompt), score.insertions, None)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    # ------------------------------------------------------------------ insertion log
    def _record(self, kind: str, prompt_tokens: int, insertions, text: str | None) -> None:
        woven = [i for i in insertions if i.inserted]
        record = {
            "kind": kind,
            "prompt_tokens": prompt_tokens,
            "insertions": [{"position": i.position, "p_invoke": i.probability} for i in woven],
            "declined": len(insertions) - len(woven),
        }
        if text is not None:
            record["text"] = text
        self.insertion_records.append(record)
        if self.insertion_log is not None:
            self.insertion_log.parent.mkdir(parents=True, exist_ok=True)
            with self.insertion_log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def insertion_summary(self) -> dict:
        """Samples scored or generated so far, and their insertions (mean per sample)."""
        n = len(self.insertion_records)
        total = sum(len(r["insertions"]) for r in self.insertion_records)
        return {"samples": n, "insertions": total, "insertions_per_sample": total / n if n else 0.0}

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["memgen"] = dict(self.memory_settings)
        return info
