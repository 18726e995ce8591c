"""The demo's arms. Each trains (or not) on the same domain-B data with the same step budget
through memgen's public training API, and is evaluated through ``memgen.evaluate``.

| arm | what trains | evaluated with |
| --- | --- | --- |
| vanilla | nothing | memory off |
| lora_sft | peft LoRA on the reasoner (merged afterwards) | memory off |
| memgen_sft | weaver SFT, latents at prompt end + every delimiter | memory always |
| memgen_trigger | + trigger RL on the SFT weaver (sparsity penalty), on a mix of A and B prompts | memory trigger |
| memgen_random | the SFT weaver with a coin-flip trigger | memory random:0.5 |
| prompt_only | weaver SFT with latents only at the prompt end (SoftCoT-style) | prompt end only |
| memgen_grpo | a short weaver GRPO from the SFT weaver | memory always |
| expel (``--experience-arms``) | nothing: the reasoner's own B attempts gathered, insights extracted by it | off, ExpeL prompt |
| awm (``--experience-arms``) | nothing: workflows induced by the reasoner from its B successes | off, AWM prompt |
| memgen_sft_retrieval (``--experience-arms``) | weaver SFT, each insertion reading retrieved solved problems | always + retrieval |

The trigger trains on A prompts as well as B: A is where the frozen reasoner already knows the
skill, so the sparsity penalty should teach it to stay quiet there and spend insertions on B.

The continual stage (:func:`lora_continual`, :func:`memgen_continual`) takes the B-trained LoRA
and weaver on to a further skill D with the same recipe: one adapter trained in sequence, as in
the paper's Table 4 (one MemGen trained task after task).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import MemGenConfig
from ..model import MemGen
from ..tasks import Task
from ..train import TriggerTrainConfig, WeaverTrainConfig, train_trigger, train_weaver


@dataclass
class ArmResult:
    name: str
    memory: str
    trainable_params: int
    train_seconds: float
    model: MemGen = field(repr=False)
    eval_overrides: dict = field(default_factory=dict)
    state: object = field(default=None, repr=False)
    """What a later stage continues from (the peft model of ``lora_sft``)."""


def count(params) -> int:
    return sum(p.numel() for p in params)


def _weaver_config(cfg, out: Path, name: str, **overrides) -> WeaverTrainConfig:
    values = dict(
        model="demo",
        data="demo",
        output_dir=str(out / "runs" / name),
        max_steps=cfg.sft_steps,
        per_device_batch_size=cfg.batch_size,
        learning_rate=cfg.weaver_lr,
        seed=cfg.seed,
        save_every=0,
        progress=cfg.progress,
        max_insertions=cfg.max_insertions,
        tensorboard=False,
        lr_scheduler="cosine",
        warmup_steps=10,
        max_new_tokens=cfg.max_new_tokens,
    )
    values.update(overrides)
    return WeaverTrainConfig(**values)


def memgen_config(cfg) -> MemGenConfig:
    return MemGenConfig(
        prompt_latents=cfg.latents,
        inference_latents=cfg.latents,
        lora_r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        trigger_hidden=64,
        latent_positions=cfg.latent_positions,
        trigger_at_prompt_end=cfg.trigger_at_prompt_end,
        delimiters=list(cfg.delimiters),
        latent_init_text=cfg.latent_init_text or None,
    )


def vanilla(base, tokenizer, cfg, train: Task, out: Path) -> ArmResult:
    return ArmResult("vanilla", "off", 0, 0.0, MemGen(base, tokenizer, memgen_config(cfg)))


def _train_lora(model, tokenizer, cfg, train: Task, desc: str) -> list:
    """Completion-only NLL on ``model``'s trainable (LoRA) weights, same batches and steps as weaver SFT."""
    from tqdm.auto import tqdm

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lora_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, cfg.lora_lr, total_steps=cfg.sft_steps, pct_start=0.07, anneal_strategy="cos"
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id
    model.train()
    for _ in tqdm(range(cfg.sft_steps), desc=desc, disable=not cfg.progress, dynamic_ncols=True):
        picks = torch.randint(len(train.records), (cfg.batch_size,), generator=generator).tolist()
        pairs = []
        for i in picks:
            r = train.records[i]
            pairs.append(
                (
                    tokenizer(r.prompt)["input_ids"],
                    tokenizer(r.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                )
            )
        completion_nll_step(model, trainable, optimizer, scheduler, pairs, pad)
    model.eval()
    return trainable


def completion_nll_step(model, trainable, optimizer, scheduler, pairs, pad: int) -> torch.Tensor:
    """One optimizer step of answer-only NLL on (prompt ids, completion ids) pairs, right-padded; returns the loss."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.tensor([p + c + [pad] * (width - len(p) - len(c)) for p, c in pairs])
    labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c)) for p, c in pairs])
    mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in pairs])
    # labels are shifted inside the model: position t predicts t + 1, as memgen's SFT does.
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _merged(peft_model, tokenizer, cfg) -> MemGen:
    """A MemGen (memory off) over a merged copy, so the peft model can go on training."""
    return MemGen(copy.deepcopy(peft_model).merge_and_unload().eval(), tokenizer, memgen_config(cfg))


def lora_sft(base, tokenizer, cfg, train: Task, out: Path) -> ArmResult:
    """peft LoRA on a copy of the reasoner, completion-only NLL, same batches and steps as weaver SFT."""
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=memgen_config(cfg).lora_target_modules),
    )
    trainable = _train_lora(model, tokenizer, cfg, train, "train lora_sft")
    seconds = time.perf_counter() - started
    return ArmResult("lora_sft", "off", count(trainable), seconds, _merged(model, tokenizer, cfg), {}, model)


def lora_continual(previous: ArmResult, tokenizer, cfg, train: Task) -> ArmResult:
    """The B-trained LoRA, trained further on the next skill with the same recipe."""
    started = time.perf_counter()
    model = previous.state
    trainable = _train_lora(model, tokenizer, cfg, train, f"train lora_sft on {train.name}")
    return ArmResult(
        "lora_sft", "off", count(trainable), time.perf_counter() - started, _merged(model, tokenizer, cfg), {}, model
    )


def memgen_sft(base, tokenizer, cfg, train: Task, out: Path) -> ArmResult:
    model = MemGen(base, tokenizer, memgen_config(cfg))
    started = time.perf_counter()
    train_weaver(_weaver_config(cfg, out, "memgen_sft", method="sft", insertion="all"), model=model, task=train)
    model.save_pretrained(out / "adapters" / "memgen_sft")
    return ArmResult("memgen_sft", "always", count(model.weaver_parameters()), time.perf_counter() - started, model)


def memgen_trigger(base, tokenizer, cfg, train: Task, out: Path, sft: ArmResult) -> ArmResult:
    """Trigger RL on the frozen SFT weaver; ``train`` is the A+B mix (see the module docstring)."""
    model = MemGen.from_pretrained(out / "adapters" / "memgen_sft", base, tokenizer)
    config = TriggerTrainConfig(
        model="demo",
        data="demo",
        output_dir=str(out / "runs" / "memgen_trigger"),
        max_steps=cfg.trigger_steps,
        per_device_batch_size=cfg.rl_batch_size,
        num_generations=cfg.num_generations,
        max_new_tokens=cfg.max_new_tokens,
        learning_rate=cfg.trigger_lr,
        sparsity_lambda=cfg.sparsity_lambda,
        seed=cfg.seed,
        save_every=0,
        progress=cfg.progress,
        max_insertions=cfg.max_insertions,
        tensorboard=False,
        stop=["\n"],
    )
    started = time.perf_counter()
    train_trigger(config, model=model, task=train)
    model.save_pretrained(out / "adapters" / "memgen_trigger")
    return ArmResult(
        "memgen_trigger",
        "trigger",
        count(model.weaver_parameters()) + count(model.trigger_parameters()),
        sft.train_seconds + time.perf_counter() - started,
        model,
    )


def memgen_random(base, tokenizer, cfg, train: Task, out: Path, sft: ArmResult) -> ArmResult:
    return ArmResult("memgen_random", "random:0.5", sft.trainable_params, sft.train_seconds, sft.model)


def prompt_only(base, tokenizer, cfg, train: Task, out: Path) -> ArmResult:
    model = MemGen(base, tokenizer, memgen_config(cfg))
    started = time.perf_counter()
    train_weaver(_weaver_config(cfg, out, "prompt_only", method="sft", max_insertions=0), model=model, task=train)
    trainable = count(model.weaver_parameters()) - model.weaver.inference_queries.numel()
    return ArmResult("prompt_only", "always", trainable, time.perf_counter() - started, model, {"max_insertions": 0})


def memgen_grpo(base, tokenizer, cfg, train: Task, out: Path, sft: ArmResult) -> ArmResult:
    model = MemGen.from_pretrained(out / "adapters" / "memgen_sft", base, tokenizer)
    started = time.perf_counter()
    train_weaver(
        _weaver_config(
            cfg,
            out,
            "memgen_grpo",
            method="grpo",
            max_steps=cfg.grpo_steps,
            per_device_batch_size=cfg.rl_batch_size,
            num_generations=cfg.num_generations,
            learning_rate=cfg.grpo_lr,
            lr_scheduler="constant",
            warmup_steps=0,
            loss_type="dapo",
            stop=["\n"],
        ),
        model=model,
        task=train,
    )
    return ArmResult(
        "memgen_grpo",
        "always",
        count(model.weaver_parameters()),
        sft.train_seconds + time.perf_counter() - started,
        model,
    )


def memgen_continual(base, tokenizer, cfg, train: Task, out: Path, previous: Path) -> ArmResult:
    """The weaver saved at ``previous``, trained on by SFT on the next skill with the same recipe."""
    model = MemGen.from_pretrained(previous, base, tokenizer)
    started = time.perf_counter()
    train_weaver(
        _weaver_config(cfg, out, f"memgen_sft-{train.name}", method="sft", insertion="all"), model=model, task=train
    )
    return ArmResult("memgen_sft", "always", count(model.weaver_parameters()), time.perf_counter() - started, model)


# ------------------------------------------------------------------ experience arms (issue 11)
# The demo's own test-prompt templates: the reasoner is character-level and was pretrained on
# packed problems, so solved examples go in front of the problem as plain "Q: ... A: ..." lines,
# which is in its distribution; the package's English templates are not (most of their
# characters are outside its alphabet). Insights and workflows go in only if the reasoner wrote any.
EXPEL_TEMPLATE = "{examples}{prompt}"
EXPEL_TEMPLATE_WITH_INSIGHTS = "{insights}\n{examples}{prompt}"
AWM_TEMPLATE = "{workflows}\n{prompt}"


def build_experience(base, tokenizer, cfg, train: Task, out: Path) -> dict:
    """ExpeL's gathering (the frozen reasoner attempts B training problems), its insight extraction and
    AWM's offline induction, all with the reasoner itself as the LLM. Returns what each produced."""
    from ..experience import ExperienceStore
    from ..experience.awm import AWMConfig, induce_workflows
    from ..experience.expel import ExpeLConfig, extract_insights, gather_experience, reasoner_llm

    started = time.perf_counter()
    model = MemGen(base, tokenizer, memgen_config(cfg))  # memory off: the vanilla reasoner
    attempts = Task(train.name, train.records[: cfg.experience_size], train.reward, {}, train.stop)
    expel = ExpeLConfig(
        attempts=2,
        max_new_tokens=cfg.max_new_tokens,
        compare_pairs=10,
        success_batches=2,
        llm_max_new_tokens=64,
        top_k=cfg.experience_top_k,
        seed=cfg.seed,
    )
    llm = reasoner_llm(model, max_new_tokens=64, stop=["\n\n"], batch_size=cfg.eval_batch_size)
    path = out / "experience"
    with ExperienceStore(path, retriever="bm25") as store:
        gathered = gather_experience(model, attempts, store, expel, batch_size=cfg.eval_batch_size, run="demo")
        insights = extract_insights(store, train.name, llm, expel)
        successes = store.records(kind="trajectory", success=True, task=train.name)[-16:]
        workflows = induce_workflows(store, train.name, llm, AWMConfig(induction_batch=8), successes)
    templates = {"expel": EXPEL_TEMPLATE_WITH_INSIGHTS if insights["insights"] else EXPEL_TEMPLATE, "awm": AWM_TEMPLATE}
    for name, text in templates.items():
        (out / f"{name}_template.txt").write_text(text)
    return {
        "store": str(path),
        "task": train.name,
        "gathered": gathered,
        "insights": insights,
        "workflows": workflows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _prompt_arm(name: str, base, tokenizer, cfg, out: Path, experience: dict) -> ArmResult:
    return ArmResult(
        name,
        "off",
        0,
        experience["seconds"],
        MemGen(base, tokenizer, memgen_config(cfg)),
        {
            "memory_source": name,
            "experience": experience["store"],
            "experience_task": experience["task"],
            "experience_template": str(out / f"{name}_template.txt"),
            "experience_top_k": cfg.experience_top_k,
        },
    )


def expel(base, tokenizer, cfg, train: Task, out: Path, experience: dict) -> ArmResult:
    """ExpeL: the frozen reasoner with its insights (if any) and the most similar solved B problems in the prompt."""
    return _prompt_arm("expel", base, tokenizer, cfg, out, experience)


def awm(base, tokenizer, cfg, train: Task, out: Path, experience: dict) -> ArmResult:
    """AWM: the frozen reasoner with the workflows it induced (if any) in front of the prompt."""
    return _prompt_arm("awm", base, tokenizer, cfg, out, experience)


def memgen_sft_retrieval(base, tokenizer, cfg, train: Task, out: Path, experience: dict) -> ArmResult:
    """Weaver SFT in which every insertion also reads the most similar solved problems from the store."""
    model = MemGen(base, tokenizer, memgen_config(cfg))
    retrieval = dict(
        experience=experience["store"],
        experience_embedder="bm25",
        retrieval_top_p=cfg.experience_top_k,
        retrieval_max_tokens=cfg.retrieval_max_tokens,
        retrieval_query="prompt",
    )
    started = time.perf_counter()
    train_weaver(
        _weaver_config(cfg, out, "memgen_sft_retrieval", method="sft", insertion="all", **retrieval),
        model=model,
        task=train,
    )
    return ArmResult(
        "memgen_sft_retrieval",
        "always",
        count(model.weaver_parameters()),
        experience["seconds"] + time.perf_counter() - started,
        model,
        {"memory_source": "weaver+retrieval", **retrieval},
    )
