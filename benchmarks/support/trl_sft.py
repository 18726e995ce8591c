"""TRL's ``SFTTrainer`` + peft LoRA as the benchmarks run it beside memgen: same rows, batch, rank and targets."""

from __future__ import annotations

import time

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer


class StepTimer(TrainerCallback):
    """Collects the wall time of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, *args, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def sft_trainer(
    model, tokenizer, rows: list[dict], out: str, *, steps: int, batch: int, lora_r: int, targets, timer, **config
):
    """A trainer over ``rows`` ({"prompt", "completion"}) with completion-only loss on CPU; ``config``: more SFTConfig fields."""
    args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=None,
        completion_only_loss=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **config,
    )
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(targets), task_type="CAUSAL_LM")
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
