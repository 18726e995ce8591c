"""memgen in one page: wrap a causal LM, generate with memory, train the weaver a few steps, save and reload.

Runs offline on a CPU in seconds with a tiny randomly initialised Qwen2; swap in any
``AutoModelForCausalLM`` and its tokenizer for real use.
"""

import torch

from memgen import GenerateConfig, MemGen, MemGenConfig
from memgen.tiny import tiny_causal_lm, tiny_tokenizer

torch.manual_seed(0)
tok = tiny_tokenizer()
base = tiny_causal_lm(tok, hidden_size=64, num_layers=2, init_std=0.2)
model = MemGen(base, tok, MemGenConfig(prompt_latents=4, inference_latents=4))

# 1. Generate: latents at the prompt end and at every delimiter (',' '.' '\n').
config = GenerateConfig(memory="always", max_new_tokens=24, return_logprobs=True)
out = model.generate(["Q: 2 + 3 = ?", "Hello,"], config)
for c in out.completions:
    print(f"{c.text!r:40} inserted before tokens {c.insertion_positions}")

# 2. Weaver SFT steps: the reasoner stays frozen, gradients flow through the latents.
prompt = model.encode_prompts("Q: 2 + 3 = ?")
target = tok(" 2, 3. So 5.\n")["input_ids"]
points = model.delimiter_positions(target)  # prompt end + after each delimiter
optimizer = torch.optim.AdamW(model.weaver_parameters(), lr=3e-3)
model.train()
for step in range(30):
    tf = model.teacher_forced(prompt, [target], [points])
    loss = -(tf.logprobs * tf.mask).sum() / tf.mask.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  completion NLL {loss.item():.3f}")
model.eval()

# 3. Save (peft adapter + memgen_config.json + safetensors) and restore onto a fresh base copy.
model.save_pretrained("runs/quickstart-adapter")
restored = MemGen.from_pretrained(
    "runs/quickstart-adapter", tiny_causal_lm(tok, hidden_size=64, num_layers=2, init_std=0.2), tok
)
same = (
    restored.generate("Q: 2 + 3 = ?", config).completions[0].token_ids
    == model.generate("Q: 2 + 3 = ?", config).completions[0].token_ids
)
print("restored adapter reproduces generation:", same)
