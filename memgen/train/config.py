"""Typed configs for ``memgen train weaver`` and ``memgen train trigger`` (CLI flags, YAML or Python).

Field names follow TRL where TRL has the concept (``per_device_train_batch_size`` is shortened
to ``per_device_batch_size``; ``num_generations``, ``loss_type``, ``epsilon``, ``beta``,
``num_iterations``, ``scale_rewards``, ``mask_truncated_completions`` mean what they mean
in ``GRPOConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MemGenConfig, MemoryPolicy
from ..dataclass_cli import check_ranges, help_field
from ..errors import ConfigError
from ..experience.weaving import RetrievalFields
from ..precision import BASE_DTYPES
from ..tasks.sandbox import CodeExecutionFields

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


@dataclass
class TrainConfig(CodeExecutionFields, RetrievalFields):
    """Fields shared by every training method."""

    model: str = help_field("", "base model directory (save_pretrained) or hub name")
    adapter: str | None = help_field(None, "start from this memgen adapter (e.g. the SFT weaver before GRPO)")
    output_dir: str = help_field("runs/memgen", "where checkpoints, metrics.jsonl and the final adapter go")
    task: str = help_field(
        "jsonl",
        "data adapter: gsm8k | math | math500 | gpqa | qa | jsonl | kodcode | "
        "bigcodebench, or an agent task: alfworld | ledger",
    )
    data: str = help_field(
        "",
        "training data file (see --task); alfworld: the directory of the game archives; ledger: demo domains, e.g. B",
    )
    max_turns: int = help_field(0, "agent tasks: turns per episode (0: the task's default, 50 for alfworld)", ge=0)
    step_timeout: float = help_field(30.0, "agent tasks: seconds an environment step may take", gt=0)
    invalid_action_penalty: float = help_field(
        0.0,
        "agent RL per-step shaping: subtracted from an episode's reward "
        "(success) per turn whose reply held no action (0 = off)",
        ge=0,
    )
    limit: int | None = help_field(None, "use only the first N records", ge=1)
    split: str = help_field("", "bigcodebench: complete (default) | instruct")
    skip_malformed: bool = help_field(False, "skip malformed data lines (reported as file:line) instead of stopping")
    use_chat_template: bool = help_field(
        False, "render prompts with the tokenizer's chat template (plain prompts become one user turn)"
    )
    seed: int = help_field(0, "seed for data order, insertion subsets, rollouts and initialisation", ge=0)
    max_steps: int = help_field(100, "optimizer steps", ge=1)
    per_device_batch_size: int = help_field(8, "prompts per process per micro-step", ge=1)
    gradient_accumulation_steps: int = help_field(1, "micro-steps per optimizer step", ge=1)
    learning_rate: float = help_field(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = help_field(0.0, "AdamW weight decay", ge=0)
    lr_scheduler: str = help_field("constant", "constant | linear | cosine (after warmup)")
    warmup_steps: int = help_field(0, "linear warmup steps", ge=0)
    max_grad_norm: float = help_field(1.0, "gradient clipping norm (0 = off)", ge=0)
    mixed_precision: str = help_field("no", "no | bf16 | fp16 (accelerate autocast)")
    gradient_checkpointing: bool = help_field(
        False, "recompute decoder layers in the backward pass: far less activation memory for ~one more forward"
    )
    base_dtype: str = help_field(
        "float32",
        "dtype the frozen base is stored and run in: float32 | bfloat16 | "
        "auto (bfloat16 where bf16 is native); trainable weights stay float32",
    )
    save_every: int = help_field(50, "write a checkpoint every N steps (0 = only at the end)", ge=0)
    save_total_limit: int = help_field(2, "keep this many newest checkpoints", ge=1)
    log_every: int = help_field(1, "log metrics every N steps", ge=1)
    resume: bool = help_field(False, "continue from the newest checkpoint in output_dir")
    tensorboard: bool = help_field(True, "also write TensorBoard events when tensorboard is installed")
    progress: bool = help_field(True, "show a progress bar")
    prompt_latents: int = help_field(8, "K at the prompt end (new weavers only)", ge=1)
    inference_latents: int = help_field(8, "K at in-reasoning delimiters (new weavers only)", ge=1)
    lora_r: int = help_field(16, "weaver LoRA rank (new weavers only)", ge=1)
    lora_alpha: int = help_field(32, "weaver LoRA alpha (new weavers only)", gt=0)
    delimiters: list[str] = help_field([",", ".", "\n"], "delimiter characters (new weavers only)")
    latent_positions: str = help_field("advance", "latent position ids, advance | tied (new weavers only)")
    latent_init_text: str | None = help_field(None, "start latents at this text's token embeddings (new weavers only)")
    anchor_context: bool = help_field(True, "map the insertion point's state into the latents (new weavers only)")
    max_prompt_tokens: int = help_field(512, "prompts are truncated from the left to this many tokens", ge=1)
    experience: str | None = help_field(
        None, "experience store the weaver reads on every invocation (retrieval-augmented weaving, paper App. E)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.delimiters, str):
            self.delimiters = list(self.delimiters)
        if not self.model:
            raise ConfigError("--model is required (a base model directory or hub name)")
        if not self.data:
            raise ConfigError("--data is required")
        check_ranges(self)
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"base_dtype must be one of {list(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ConfigError(f"lr_scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")

    def memgen_config(self) -> MemGenConfig:
        return MemGenConfig(
            prompt_latents=self.prompt_latents,
            inference_latents=self.inference_latents,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            delimiters=self.delimiters,
            latent_positions=self.latent_positions,
            latent_init_text=self.latent_init_text,
            anchor_context=self.anchor_context,
        )


@dataclass
class RolloutConfig:
    """Sampling and RL fields shared by weaver GRPO and trigger RL."""

    num_generations: int = help_field(4, "G: samples per prompt (the prompt's cache is shared by them)", ge=2)
    max_new_tokens: int = help_field(64, "longest sampled completion", ge=1)
    temperature: float = help_field(1.0, "sampling temperature (log-probs use the same temperature)", gt=0)
    top_p: float = help_field(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = help_field(0, "top-k sampling (0 = off)", ge=0)
    max_insertions: int = help_field(8, "cap on in-reasoning insertions per rollout", ge=0)
    scale_rewards: bool = help_field(True, "divide group-centred rewards by the group std (False for Dr. GRPO)")
    reward_funcs: list[str] = help_field([], "reward functions: 'task' or 'module:function' (TRL signature)")
    reward_weights: list[float] = help_field([], "weights of --reward-funcs (default: all 1)")
    stop: list[str] = help_field([], "stop strings for rollouts (default: the task's)")

    def check_rewards(self) -> None:
        funcs = self.reward_funcs or ["task"]
        if self.reward_weights and len(self.reward_weights) != len(funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} weight(s) for {len(funcs)} reward function(s) {funcs}"
            )


@dataclass
class WeaverTrainConfig(RolloutConfig, TrainConfig):
    """``memgen train weaver``: SFT or GRPO of the weaver with the reasoner frozen and no trigger."""

    method: str = help_field("sft", "sft | grpo")
    insertion: str = help_field("all", "SFT insertion points: all delimiters, or a random subset")
    insertion_prob: float = help_field(0.5, "keep-probability of each delimiter with --insertion random", ge=0, le=1)
    max_completion_tokens: int = help_field(256, "SFT completions are truncated to this many tokens", ge=2)
    memory: str = help_field("always", "GRPO rollout insertion policy: always | random:P")
    loss_type: str = help_field("grpo", "grpo | dr_grpo | dapo (loss normalisation, as in TRL)")
    epsilon: float = help_field(0.2, "lower clip range of the importance ratio", ge=0, lt=1)
    epsilon_high: float | None = help_field(None, "upper clip range (default: epsilon; DAPO uses 0.28)", ge=0)
    num_iterations: int = help_field(1, "optimisation passes per batch of rollouts (importance ratios when > 1)", ge=1)
    beta: float = help_field(0.0, "KL coefficient towards the memory-off reasoner (0 = no KL)", ge=0)
    mask_truncated_completions: bool = help_field(False, "exclude completions cut by max_new_tokens from the loss")

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        self.check_rewards()
        if self.method not in ("sft", "grpo"):
            raise ConfigError(f"method must be sft or grpo, got {self.method!r}")
        if self.insertion not in ("all", "random"):
            raise ConfigError(f"insertion must be all or random, got {self.insertion!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if MemoryPolicy.parse(self.memory).kind in ("off", "trigger"):
            raise ConfigError("weaver GRPO rolls out with memory 'always' or 'random:P' (the trigger is trained later)")


@dataclass
class TriggerTrainConfig(RolloutConfig, TrainConfig):
    """``memgen train trigger``: RL of the trigger head with the weaver frozen."""

    adapter: str | None = help_field(None, "the trained weaver adapter (required)")
    sparsity_lambda: float = help_field(0.1, "λ of the reward-adaptive sparsity penalty (paper Eqs. 8-9)", ge=0)
    insert_at_prompt_end: bool = help_field(True, "weave at the prompt end during rollouts")
    init_prob: float | None = help_field(
        None,
        "P(invoke) at which every untrained trigger head starts RL (e.g. 0.9: start near "
        "the always-on policy the weaver was trained under); None: as the adapter built it",
        gt=0,
        lt=1,
    )
    # Off by default here, unlike weaver GRPO: in a group whose rollouts tie on task reward
    # (all right or all wrong, most groups), the std division blows the small sparsity
    # penalties up to unit advantages, so the trigger learns "invoke less" whatever memory does.
    scale_rewards: bool = help_field(
        False,
        "divide group-centred rewards by the group std (True: GRPO; the "
        "penalty alone then sets full-size advantages in tied groups)",
    )

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        self.check_rewards()
