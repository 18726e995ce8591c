"""memgen inside lm-evaluation-harness: memory off is lm-eval's own ``hf`` model, sample for sample.

The reference is lm-eval's ``HFLM`` on the same saved model, with the tokenizer memgen loads
(transformers' AutoTokenizer rebuilds the tiny test tokenizer as Qwen2's and splits text
differently, so both sides are given the tokenizer the model was saved with).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import memgen.harness.model  # noqa: E402,F401  (registers --model memgen)
from memgen.harness.tasks import write_local_tasks  # noqa: E402
from memgen.loading import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return TaskManager(include_path=str(write_local_tasks(DATA, tmp_path_factory.mktemp("tasks"))))


def hf_backend(directory, batch_size=2):
    return HFLM(
        pretrained=str(directory),
        tokenizer=load_tokenizer(directory),
        dtype="float32",
        device="cpu",
        batch_size=batch_size,
    )


def run(model, tasks, task, **kw):
    kw.setdefault("limit", 4)
    args = {"model_args": kw.pop("model_args")} if "model_args" in kw else {}
    return lm_eval.simple_evaluate(model=model, tasks=[task], log_samples=True, task_manager=tasks, **args, **kw)


def assert_same_samples(a, b, task):
    left, right = a["samples"][task], b["samples"][task]
    assert len(left) == len(right) > 0
    for x, y in zip(left, right):
        assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
        assert x["resps"] == y["resps"], x["doc_id"]  # generations, or (log-likelihood, is_greedy) exactly
        assert x["filtered_resps"] == y["filtered_resps"]
    metrics = {k: v for k, v in a["results"][task].items() if "," in k}
    assert metrics == {k: v for k, v in b["results"][task].items() if "," in k}


SETTINGS = {
    "gsm8k_local": dict(num_fewshot=1, gen_kwargs="max_gen_toks=32"),
    "gpqa_diamond_zeroshot_local": {},
}


@pytest.mark.parametrize("task", list(SETTINGS))
def test_memory_off_equals_lm_evals_hf_model(saved_tiny, tasks, task):
    base = saved_tiny["base"]
    want = run(hf_backend(base), tasks, task, **SETTINGS[task])
    got = run("memgen", tasks, task, model_args={"pretrained": str(base), "batch_size": 2}, **SETTINGS[task])
    assert_same_samples(want, got, task)


def test_chat_template_and_system_instruction_as_lm_eval_passes_them(saved_tiny, tasks):
    base = saved_tiny["base"]
    kw = dict(apply_chat_template=True, system_instruction="Answer briefly.", limit=3, **SETTINGS["gsm8k_local"])
    want = run(hf_backend(base), tasks, "gsm8k_local", **kw)
    got = run("memgen", tasks, "gsm8k_local", model_args={"pretrained": str(base), "batch_size": 2}, **kw)
    prompt = str(got["samples"]["gsm8k_local"][0]["arguments"])
    assert "system: Answer briefly." in prompt and "assistant:" in prompt  # the tiny model's template
    assert_same_samples(want, got, "gsm8k_local")


@pytest.mark.parametrize("memory", ["always", "trigger"])
def test_memory_runs_complete_and_log_insertions_per_sample(saved_tiny, tasks, tmp_path, memory):
    log = tmp_path / "insertions.jsonl"
    model_args = {
        "pretrained": str(saved_tiny["base"]),
        "adapter": str(saved_tiny["adapter"]),
        "memory": memory,
        "batch_size": 2,
        "insertion_log": str(log),
    }
    out = lm_eval.simple_evaluate(
        model="memgen",
        model_args=model_args,
        tasks=["gsm8k_local", "gpqa_diamond_zeroshot_local"],
        limit=2,
        num_fewshot=1,
        gen_kwargs="max_gen_toks=24",
        task_manager=tasks,
    )
    assert set(out["results"]) == {"gsm8k_local", "gpqa_diamond_zeroshot_local"}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("generate_until") == 2 and kinds.count("loglikelihood") == 2 * 4
    woven = sum(len(r["insertions"]) for r in records)
    assert woven >= (len(records) if memory == "always" else 1)  # always weaves at every prompt end
    assert out["config"]["model_args"]["memory"] == memory


def test_memgen_lm_eval_command_line(saved_tiny, tmp_path):
    model_args = f"pretrained={saved_tiny['base']},adapter={saved_tiny['adapter']},memory=always"
    done = subprocess.run(
        [sys.executable, "-m", "memgen", "lm-eval", "--model", "memgen", "--model_args", model_args]
        + ["--tasks", "gsm8k_local", "--limit", "2", "--num_fewshot", "1", "--gen_kwargs", "max_gen_toks=16"]
        + ["--data-dir", str(DATA), "--output_path", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and "gsm8k_local" in json.loads(results[0].read_text())["results"]
    assert "exact_match" in done.stdout


def test_real_model_memory_off_equals_lm_evals_hf_model(smollm2_dir, tasks):
    for task, kw in (
        ("gsm8k_local", dict(limit=2, num_fewshot=1, gen_kwargs="max_gen_toks=48")),
        ("gpqa_diamond_zeroshot_local", dict(limit=2)),
    ):
        want = run(hf_backend(smollm2_dir, batch_size=1), tasks, task, **kw)
        got = run("memgen", tasks, task, model_args={"pretrained": str(smollm2_dir)}, **kw)
        assert_same_samples(want, got, task)
