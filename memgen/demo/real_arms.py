"""The real-model experiment's arms: each trained once per seed, saved, and loaded on a re-run.

| arm | what trains | evaluated with |
| --- | --- | --- |
| vanilla | nothing | memory off |
| lora_sft | peft LoRA on the reasoner, same rank, targets, data, steps and schedule as the weaver | memory off, merged |
| memgen_sft | weaver SFT, latents at the prompt end and every delimiter | memory always |
| memgen_trigger | trigger RL on the frozen SFT weaver (sparsity penalty), on in-domain + known prompts | memory trigger |
| prompt_only | weaver SFT with latents at the prompt end only (SoftCoT-style) | prompt end only |
| memgen_grpo | a short weaver GRPO from the SFT weaver | memory always |

Every arm trains on the same records through the model's own chat template, with the loss on
the answer tokens (and the end-of-turn token) only. A finished arm is an adapter directory
with ``train.json`` (seconds, trainable parameters), renamed into place only when complete, so
an interrupted run loads what finished and trains the rest; every training run (LoRA-SFT's
too) also checkpoints every ``save_every`` steps and resumes mid-run.

LoRA-SFT is evaluated merged into a float32 copy of the base. Merged into bfloat16 weights, an
update smaller than half a bfloat16 step of its weight (2^-9 relative) would round away, so a
bf16 merge would not be the model that was trained; unmerged, the peft layers could not sit
under MemGen's own adapter. Its decoding is therefore float32 while the other arms' is the
base dtype (see docs/results.md for what that costs).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_directory
from ..config import MemGenConfig
from ..data import prompt_token_ids
from ..model import MemGen
from ..tasks import Task
from ..train import TriggerTrainConfig, WeaverTrainConfig, train_trigger, train_weaver
from ..train.runner import STATE_FILE, latest_checkpoint
from .arms import completion_nll_step

ARMS = ["vanilla", "lora_sft", "memgen_sft", "memgen_trigger", "prompt_only", "memgen_grpo"]
MEMORY = {
    "vanilla": "off",
    "lora_sft": "off",
    "memgen_sft": "always",
    "memgen_trigger": "trigger",
    "prompt_only": "prompt_end",
    "memgen_grpo": "always",
}


def memgen_config(cfg) -> MemGenConfig:
    # The prompt-end insertion is a trigger decision too, as in the default demo: prompt-end latents
    # alone move the model on prompts it already handles (the prompt_only arm's KL), and a trigger
    # that can only skip delimiters could not keep those prompts unchanged.
    return MemGenConfig(
        prompt_latents=cfg.latents,
        inference_latents=cfg.latents,
        lora_r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        trigger_at_prompt_end=True,
    )


def count(params) -> int:
    return sum(p.numel() for p in params)


def _finish(directory: Path, save, seconds: float, params: int) -> None:
    """Write an adapter with ``save(scratch)`` and its train.json, renamed into place only when complete."""
    with atomic_directory(directory) as scratch:
        save(scratch)
        (scratch / "train.json").write_text(
            json.dumps({"train_seconds": round(seconds, 1), "trainable_params": params})
        )


def train_info(directory: Path) -> dict | None:
    path = directory / "train.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run_fields(cfg, run_dir: Path) -> dict:
    """What every weaver and trigger run of the real demo shares: in-memory model and data, checkpoints
    (resumed when one exists), the chat template and the insertion cap."""
    return dict(
        model="in-memory",
        data="in-memory",
        output_dir=str(run_dir),
        seed=cfg.seed,
        save_every=cfg.save_every,
        save_total_limit=1,
        progress=cfg.progress,
        max_insertions=cfg.max_insertions,
        tensorboard=False,
        max_new_tokens=cfg.max_new_tokens,
        use_chat_template=True,
        resume=latest_checkpoint(run_dir) is not None,
    )


def _weaver_train_config(cfg, run_dir: Path, **overrides) -> WeaverTrainConfig:
    values = dict(
        _run_fields(cfg, run_dir),
        max_steps=cfg.sft_steps,
        per_device_batch_size=cfg.batch_size,
        learning_rate=cfg.weaver_lr,
        lr_scheduler="cosine",
        warmup_steps=cfg.warmup_steps,
    )
    values.update(overrides)
    return WeaverTrainConfig(**values)


def _weaver_arm(
    name: str, base, tokenizer, cfg, seed_dir: Path, train: Task, start_from: Path | None, trainer, config
) -> float:
    model = (
        MemGen.from_pretrained(start_from, base, tokenizer)
        if start_from
        else MemGen(base, tokenizer, memgen_config(cfg))
    )
    started = time.perf_counter()
    trainer(config, model=model, task=train)
    seconds = time.perf_counter() - started
    params = count(model.weaver_parameters()) + (count(model.trigger_parameters()) if name == "memgen_trigger" else 0)
    _finish(seed_dir / "adapters" / name, lambda d: model.save_pretrained(d, save_tokenizer=False), seconds, params)
    return seconds


def train_memgen_sft(base, tokenizer, cfg, seed_dir: Path, train: Task) -> None:
    config = _weaver_train_config(cfg, seed_dir / "runs" / "memgen_sft", method="sft", insertion="all")
    _weaver_arm("memgen_sft", base, tokenizer, cfg, seed_dir, train, None, train_weaver, config)


def train_prompt_only(base, tokenizer, cfg, seed_dir: Path, train: Task) -> None:
    config = _weaver_train_config(cfg, seed_dir / "runs" / "prompt_only", method="sft", max_insertions=0)
    _weaver_arm("prompt_only", base, tokenizer, cfg, seed_dir, train, None, train_weaver, config)


def train_memgen_grpo(base, tokenizer, cfg, seed_dir: Path, train: Task) -> None:
    config = _weaver_train_config(
        cfg,
        seed_dir / "runs" / "memgen_grpo",
        method="grpo",
        max_steps=cfg.grpo_steps,
        per_device_batch_size=cfg.rl_batch_size,
        num_generations=cfg.num_generations,
        learning_rate=cfg.grpo_lr,
        lr_scheduler="constant",
        warmup_steps=0,
        loss_type="dapo",
        temperature=cfg.rollout_temperature,
    )
    _weaver_arm(
        "memgen_grpo", base, tokenizer, cfg, seed_dir, train, seed_dir / "adapters" / "memgen_sft", train_weaver, config
    )


def train_memgen_trigger(base, tokenizer, cfg, seed_dir: Path, mix: Task) -> None:
    """Trigger RL on the frozen SFT weaver; ``mix`` holds in-domain and already-known prompts."""
    run_dir = seed_dir / "runs" / "memgen_trigger"
    config = TriggerTrainConfig(
        **_run_fields(cfg, run_dir),
        max_steps=cfg.trigger_steps,
        per_device_batch_size=cfg.rl_batch_size,
        num_generations=cfg.num_generations,
        learning_rate=cfg.trigger_lr,
        sparsity_lambda=cfg.sparsity_lambda,
        temperature=cfg.rollout_temperature,
        init_prob=cfg.trigger_init_prob,
    )
    _weaver_arm(
        "memgen_trigger",
        base,
        tokenizer,
        cfg,
        seed_dir,
        mix,
        seed_dir / "adapters" / "memgen_sft",
        train_trigger,
        config,
    )


def encode_sft(tokenizer, record) -> tuple[list[int], list[int]]:
    """(prompt ids through the chat template, answer ids + end of turn): what weaver SFT trains on."""
    prompt = prompt_token_ids(record, tokenizer, True)
    completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, completion


def _save_lora_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, loop: dict, seconds: float) -> None:
    """The LoRA arm's state after ``step`` steps, written atomically; only the newest is kept."""
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state = {
        "step": step,
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": dict(loop),
        "seconds": seconds,
    }
    with atomic_directory(run_dir / f"checkpoint-{step:06d}") as scratch:
        torch.save(state, scratch / STATE_FILE)
    for old in run_dir.glob("checkpoint-*"):
        if old.name != f"checkpoint-{step:06d}":
            shutil.rmtree(old, ignore_errors=True)


def _resume_lora(run_dir: Path, model, optimizer, scheduler, loop: dict) -> tuple[int, float]:
    """Load the newest checkpoint into the arm's state; (steps done, seconds spent), (0, 0.0) if none."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return 0, 0.0
    state = torch.load(found / STATE_FILE, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loop.update(state["loop"])
    return state["step"], state["seconds"]


def train_lora_sft(base, tokenizer, cfg, seed_dir: Path, train: Task) -> None:
    """peft LoRA on a copy of the base: answer-only NLL, the weaver's batch, steps, lr schedule and data order.

    Checkpoints every ``save_every`` steps and resumes from the newest, as the weaver runs do. LoRA
    dropout is 0 and the data order comes from its own seeded generator, so a resumed run takes the
    same steps as an uninterrupted one.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from ..train.runner import _lr_lambda

    torch.manual_seed(cfg.seed)
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=memgen_config(cfg).lora_target_modules),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lora_lr, weight_decay=0.0)
    run_dir = seed_dir / "runs" / "lora_sft"
    schedule = _weaver_train_config(cfg, run_dir, learning_rate=cfg.lora_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(schedule))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loop = {"order": [], "position": 0, "epoch": 0}
    run_dir.mkdir(parents=True, exist_ok=True)
    done, spent = _resume_lora(run_dir, model, optimizer, scheduler, loop)
    metrics_path = run_dir / "metrics.jsonl"
    # Keep the logged steps the checkpoint covers; steps logged after it are taken again.
    kept = [
        line
        for line in (metrics_path.read_text().splitlines() if done and metrics_path.exists() else [])
        if json.loads(line)["step"] <= done
    ]
    metrics_path.write_text("".join(line + "\n" for line in kept))
    if done:
        print(f"memgen: resumed lora_sft from {latest_checkpoint(run_dir)} at step {done}")
    started = time.perf_counter()
    model.train()
    with open(metrics_path, "a") as metrics:
        for step in tqdm(
            range(done, cfg.sft_steps),
            desc="train lora_sft",
            initial=done,
            total=cfg.sft_steps,
            disable=not cfg.progress,
            dynamic_ncols=True,
        ):
            # The runner's order: a fresh permutation per epoch.
            if loop["position"] + cfg.batch_size > len(loop["order"]):
                loop["order"] = torch.randperm(
                    len(train.records), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + loop["epoch"])
                ).tolist()
                loop["position"], loop["epoch"] = 0, loop["epoch"] + 1
            picks = loop["order"][loop["position"] : loop["position"] + cfg.batch_size]
            loop["position"] += cfg.batch_size
            pairs = [encode_sft(tokenizer, train.records[i]) for i in picks]
            loss = completion_nll_step(model, trainable, optimizer, scheduler, pairs, pad)
            metrics.write(
                json.dumps({"step": step + 1, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0]}) + "\n"
            )
            metrics.flush()  # so a long run can be watched
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.sft_steps:
                _save_lora_checkpoint(
                    run_dir, step + 1, model, optimizer, scheduler, loop, spent + time.perf_counter() - started
                )
    model.eval()
    seconds = spent + time.perf_counter() - started
    _finish(seed_dir / "adapters" / "lora_sft", model.save_pretrained, seconds, count(trainable))


def lora_merged(base, tokenizer, cfg, directory: Path) -> MemGen:
    """The saved LoRA merged into a float32 copy of the base (see the module docstring), memory off."""
    from peft import PeftModel

    copied = copy.deepcopy(base)
    for tensor in [*copied.parameters(), *copied.buffers()]:  # transformers refuses .float() on a GGUF-loaded model
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    merged = PeftModel.from_pretrained(copied, directory).merge_and_unload().eval()
    return MemGen(merged, tokenizer, memgen_config(cfg))


TRAINERS = {
    "lora_sft": train_lora_sft,
    "memgen_sft": train_memgen_sft,
    "memgen_trigger": train_memgen_trigger,
    "prompt_only": train_prompt_only,
    "memgen_grpo": train_memgen_grpo,
}


def load_arm(name: str, base, tokenizer, cfg, seed_dir: Path) -> MemGen:
    if name == "vanilla":
        return MemGen(base, tokenizer, memgen_config(cfg))
    if name == "lora_sft":
        return lora_merged(base, tokenizer, cfg, seed_dir / "adapters" / name)
    return MemGen.from_pretrained(seed_dir / "adapters" / name, base, tokenizer)
