"""What the latents do: collect every woven latent on a task, cluster them, read them, and ablate each cluster.

``memgen analyze`` does the same from the command line. This runs offline on a CPU in seconds with
a tiny untrained Qwen2, so expect no structure: it shows the calls and the outputs (``analysis.md``,
``analysis.json`` and the plots). The demo's analysis stage runs it on trained weavers.
"""

from pathlib import Path

import torch

from memgen import MemGen, MemGenConfig
from memgen.analysis import AnalyzeConfig, analyze
from memgen.data import Record
from memgen.tasks import Task
from memgen.tiny import tiny_causal_lm, tiny_tokenizer

torch.manual_seed(0)
tok = tiny_tokenizer()
model = MemGen(
    tiny_causal_lm(tok, hidden_size=64, num_layers=2, init_std=0.2),
    tok,
    MemGenConfig(prompt_latents=4, inference_latents=4),
)


def reward(prompts, completions, answer, **_):
    return [float(c.strip().startswith(a)) for c, a in zip(completions, answer)]


records = [
    Record(prompt=f"Q: {a} + {b} =", completion=f" {a + b}.", columns={"answer": str(a + b)})
    for a in range(5)
    for b in range(5)
]
task = Task("sums", records, reward, extra_metrics={}, stop=["\n"])

out = Path("runs/example-analysis")
config = AnalyzeConfig(
    out=str(out),
    memory="always",
    max_new_tokens=12,
    batch_size=25,
    clusters=3,
    silhouette_max=4,
    tsne=False,
    progress=False,
)
report = analyze(model, task, config, log=lambda *_: None)

print("files:", sorted(p.name for p in out.iterdir()))
print(
    f"{report['insertions']} latents woven; K-means sizes {report['sizes']}, best silhouette {report['silhouette_best']}"
)
for ablation in report["ablations"]:
    print(
        f"  withhold {ablation['run']:>10}: accuracy {ablation['accuracy']:.3f}, {ablation['changed_answers']} answers changed"
    )
