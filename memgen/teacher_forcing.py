"""Teacher-forced log-probs of completions with latents spliced at given insertion points, fully batched.

Insertion positions use the engine's convention: ``p`` means the latents sit before
completion token ``p``; ``0`` is the prompt end (prompt queries), ``p >= 1`` follows
completion token ``p - 1`` (in-reasoning queries). A rollout's
``Completion.insertion_positions`` can be passed straight in. ``kinds`` overrides which queries
an insertion uses: a multi-turn episode (:mod:`memgen.agents`) is one long completion whose
later turns start with prompt-query insertions at positions > 0, and whose observation tokens
are context the caller masks out of the loss.

Cost: each row's sequence is cut at its insertion points into chunks. Round ``j`` feeds every
row's ``j``-th chunk in one batched pass on top of the shared KV cache (rows whose chunk is
shorter get masked pad slots), then weaves and feeds the ``j``-th latents of the rows that
have them. Each token is forwarded once and each insertion costs 2K slots (K query slots,
K latent slots), so a row costs O(L + 2nK) token-forwards instead of one prefix re-run
per insertion. Gradients flow from the log-probs through the cached latents into the
weaver (queries, projection, LoRA) and, via ``trigger_logits``, into the trigger; the
reasoner's weights are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .weaver import INFERENCE, PROMPT, pack_context


@dataclass
class TeacherForcedOutput:
    logprobs: torch.Tensor
    """(B, L) log p(completion token) under softmax(logits / temperature); 0 where ``mask`` is False."""
    mask: torch.Tensor
    """(B, L) True on real completion tokens."""
    trigger_logits: torch.Tensor
    """(B, L) invoke logit read at completion token i: the decision about inserting at position i + 1."""
    prompt_trigger_logits: torch.Tensor
    """(B,) invoke logit read at the last prompt token: the decision about the prompt-end insertion."""
    turn_trigger_logits: torch.Tensor | None
    """(B, L) with ``kinds``: the prompt-end head's invoke logit read at completion token i, the decision
    about a turn-start insertion at i + 1 (None without ``kinds``)."""
    latent_norm: torch.Tensor
    """Mean L2 norm of the woven latents (scalar; 0 when none)."""
    token_forwards: int
    """Slots forwarded including padding (real + masked), a measure of cost."""


def _validate(prompts, completions, insertions):
    if not (len(prompts) == len(completions) == len(insertions)):
        raise InputError(
            f"got {len(prompts)} prompts, {len(completions)} completions and "
            f"{len(insertions)} insertion lists; they must match"
        )
    if not prompts:
        raise InputError("teacher_forced needs at least one example")
    for i, (p, c, ins) in enumerate(zip(prompts, completions, insertions)):
        if len(p) == 0:
            raise InputError(f"example {i}: empty prompt")
        if len(c) == 0:
            raise InputError(f"example {i}: empty completion")
        ins = list(ins)
        if ins != sorted(set(ins)):
            raise InputError(f"example {i}: insertion positions must be strictly increasing, got {ins}")
        if ins and (ins[0] < 0 or ins[-1] > len(c) - 1):
            raise InputError(f"example {i}: insertion positions must lie in [0, {len(c) - 1}], got {ins}")


def _check_contexts(contexts, insertions):
    if contexts is None:
        return None
    if len(contexts) != len(insertions):
        raise InputError(f"got {len(contexts)} context lists for {len(insertions)} examples")
    for i, (ctx, ins) in enumerate(zip(contexts, insertions)):
        if len(ctx) != len(ins):
            raise InputError(f"example {i}: {len(ctx)} retrieved contexts for {len(ins)} insertions")
    return [[list(map(int, c)) for c in ctx] for ctx in contexts]


def _check_kinds(kinds, insertions):
    if kinds is None:
        return [[PROMPT if p == 0 else INFERENCE for p in ins] for ins in insertions]
    if len(kinds) != len(insertions) or any(len(k) != len(i) for k, i in zip(kinds, insertions)):
        raise InputError("kinds must give one query kind per insertion of every example")
    for i, row in enumerate(kinds):
        if any(k not in (PROMPT, INFERENCE) for k in row):
            raise InputError(f"example {i}: insertion kinds must be {PROMPT!r} or {INFERENCE!r}, got {row}")
    return [list(row) for row in kinds]


def _to_lists(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return [list(map(int, row)) for row in x]


def teacher_forced_forward(
    memgen, prompt_ids, completion_ids, insertions, temperature: float = 1.0, contexts=None, kinds=None
):
    prompts, completions = _to_lists(prompt_ids), _to_lists(completion_ids)
    insertions = [[int(p) for p in ins] for ins in insertions]
    _validate(prompts, completions, insertions)
    contexts = _check_contexts(contexts, insertions)
    read_turns = kinds is not None
    kinds = _check_kinds(kinds, insertions)
    reasoner, device = memgen.reasoner, memgen.device
    batch = len(prompts)
    lengths = [len(c) for c in completions]
    width = max(lengths)

    # Per row: the fed sequence (the last completion token is never fed) and its chunks.
    sequences, chunks, anchors = [], [], []
    for p, c, ins in zip(prompts, completions, insertions):
        seq = p + c[:-1]
        cuts = [len(p) - 1 + pos for pos in ins]  # seq index after which latents go
        starts = [0] + [cut + 1 for cut in cuts]
        ends = cuts + [len(seq) - 1]
        sequences.append(seq)
        chunks.append([(s, e + 1) for s, e in zip(starts, ends)])
        anchors.append(set(cuts))
    rounds = max(len(ch) for ch in chunks)

    values, rows_idx, cols_idx = [], [], []
    trig_values, trig_rows, trig_cols, turn_values = [], [], [], []
    latent_norms = []
    cache = reasoner.new_cache()
    attention = torch.zeros(batch, 0, dtype=torch.long, device=device)
    next_pos = torch.zeros(batch, dtype=torch.long, device=device)
    pad_id = memgen.tokenizer.pad_token_id or 0
    forwards = 0
    anchor = torch.zeros(batch, reasoner.hidden_size, device=device, dtype=reasoner.dtype)

    def collect(logits, targets, rows, cols):
        lp = (logits / temperature).log_softmax(dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        values.append(lp)
        rows_idx.append(rows)
        cols_idx.append(cols)

    for j in range(rounds):
        spans = [ch[j] if j < len(ch) else (0, 0) for ch in chunks]
        span_len = max(e - s for s, e in spans)
        if span_len > 0:
            ids = torch.full((batch, span_len), pad_id, dtype=torch.long)
            valid = torch.zeros((batch, span_len), dtype=torch.long)
            tgt_cols, tgt_tok, tgt_r, tgt_c = [], [], [], []
            trg_r, trg_c, trg_k = [], [], []
            for r, (s, e) in enumerate(spans):
                if e <= s:
                    continue
                seq, plen = sequences[r], len(prompts[r])
                ids[r, : e - s] = torch.tensor(seq[s:e])
                valid[r, : e - s] = 1
                for offset, idx in enumerate(range(s, e)):
                    k = idx - plen + 1  # completion index this slot predicts
                    if k >= 0 and idx not in anchors[r]:
                        tgt_r.append(r), tgt_c.append(offset), tgt_tok.append(completions[r][k]), tgt_cols.append(k)
                    if idx - plen >= 0:
                        trg_r.append(r), trg_c.append(offset), trg_k.append(idx - plen)
            ids, valid = ids.to(device), valid.to(device)
            positions = next_pos[:, None] + (valid.cumsum(dim=1) - 1).clamp_min(0)
            attention = torch.cat([attention, valid], dim=1)
            hidden = reasoner.hidden(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache)
            fed = valid.sum(dim=1)
            next_pos = next_pos + fed
            forwards += batch * span_len
            if j == 0:  # round 0 holds every row's whole prompt (its chunk ends at or after the prompt)
                plens = torch.tensor([len(p) - 1 for p in prompts], device=device)
                prompt_trigger = memgen.decision_head(prompt_end=True)(
                    hidden[torch.arange(batch, device=device), plens]
                )
            # Each row's last fed token is the insertion point of an insertion closing this round.
            last = hidden[torch.arange(batch, device=device), (fed - 1).clamp_min(0)]
            anchor = torch.where((fed > 0)[:, None], last, anchor)
            if tgt_r:
                r_t = torch.tensor(tgt_r, device=device)
                picked = hidden[r_t, torch.tensor(tgt_c, device=device)]
                collect(
                    reasoner.logits(picked),
                    torch.tensor(tgt_tok, device=device),
                    r_t,
                    torch.tensor(tgt_cols, device=device),
                )
            if trg_r:
                r_t = torch.tensor(trg_r, device=device)
                states = hidden[r_t, torch.tensor(trg_c, device=device)]
                trig_values.append(memgen.trigger(states))
                if read_turns:
                    turn_values.append(memgen.decision_head(prompt_end=True)(states))
                trig_rows.append(r_t)
                trig_cols.append(torch.tensor(trg_k, device=device))

        # Insertions closing round j: prompt-end ones (position 0) and in-reasoning ones use different queries.
        for kind in (PROMPT, INFERENCE):
            rows, targets = [], []
            for r, ins in enumerate(insertions):
                if j < len(ins) and kinds[r][j] == kind:
                    rows.append(r)
                    targets.append(ins[j])
            if not rows:
                continue
            flag = torch.zeros(batch, dtype=torch.bool, device=device)
            flag[torch.tensor(rows, device=device)] = True
            # The retrieved text the j-th insertion of each of these rows read, as the rollout did.
            context = (
                None if contexts is None else pack_context({r: contexts[r][j] for r in rows}, batch, pad_id, device)
            )
            latents, lat_hidden, attention, next_pos, _ = memgen.weave_and_feed(
                cache, attention, next_pos, flag, kind, anchor, context=context
            )
            forwards += 2 * batch * latents.shape[1]
            r_t = torch.tensor(rows, device=device)
            latent_norms.append(latents[r_t].float().norm(dim=-1).mean())
            tokens = torch.tensor([completions[r][t] for r, t in zip(rows, targets)], device=device)
            collect(reasoner.logits(lat_hidden[r_t, -1]), tokens, r_t, torch.tensor(targets, device=device))

    logprobs = torch.zeros(batch, width, device=device)
    if values:
        logprobs = logprobs.index_put((torch.cat(rows_idx), torch.cat(cols_idx)), torch.cat(values))
    trigger_logits = torch.zeros(batch, width, device=device)
    if trig_values:
        trigger_logits = trigger_logits.index_put((torch.cat(trig_rows), torch.cat(trig_cols)), torch.cat(trig_values))
    turn_logits = None
    if read_turns:
        turn_logits = torch.zeros(batch, width, device=device)
        if turn_values:
            turn_logits = turn_logits.index_put((torch.cat(trig_rows), torch.cat(trig_cols)), torch.cat(turn_values))
    mask = torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    latent_norm = torch.stack(latent_norms).mean() if latent_norms else torch.zeros((), device=device)
    return TeacherForcedOutput(logprobs, mask, trigger_logits, prompt_trigger, turn_logits, latent_norm, forwards)
