"""Local-data overrides of lm-eval's stock tasks: the stock YAML is included, only the data source changes.

- ``gsm8k_local``: lm-eval's ``gsm8k`` (5-shot, ``Question: ...\\nAnswer:``, the ``strict-match``
  and ``flexible-extract`` filters, exact match) on ``<data>/gsm8k/{train,test}.jsonl``, the
  same records as the hub's ``openai/gsm8k`` ``main`` config.
- ``gpqa_diamond_zeroshot_local`` and ``gpqa_main_zeroshot_local``: lm-eval's zero-shot GPQA
  (``multiple_choice``: ``loglikelihood`` of ``(A)``..``(D)``, acc and acc_norm, choices shuffled by
  the stock ``process_docs``) on the CSVs inside ``<data>/gpqa/gpqa.zip``, read in memory (the
  GPQA authors ask that it never be stored unpacked). It is the stock task on the stock data,
  not a stand-in; only the loader differs.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import zipfile
from pathlib import Path

import yaml

GPQA_PASSWORD = b"deserted-untie-orchid"
TASKS = ("gsm8k_local", "gpqa_diamond_zeroshot_local", "gpqa_main_zeroshot_local")


def stock_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def write_local_tasks(data_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the override YAMLs (and the GPQA loader shim) into ``out_dir`` (a new temp dir by default).

    Pass the returned directory to lm-eval as ``--include_path`` or ``TaskManager(include_path=...)``.
    """
    data = Path(data_dir).resolve()
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="memgen-lm-eval-tasks-"))
    out.mkdir(parents=True, exist_ok=True)
    stock = stock_tasks_dir()
    gsm8k = {
        "include": str(stock / "gsm8k" / "gsm8k.yaml"),
        "task": "gsm8k_local",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {"train": str(data / "gsm8k" / "train.jsonl"), "test": str(data / "gsm8k" / "test.jsonl")}
        },
    }
    (out / "gsm8k_local.yaml").write_text(yaml.safe_dump(gsm8k, sort_keys=False))
    for subset in ("gpqa_diamond", "gpqa_main"):
        config = {
            "include": str(stock / "gpqa" / "zeroshot" / "_gpqa_zeroshot_yaml"),
            "task": f"{subset}_zeroshot_local",
            "tag": [],
            "dataset_name": None,
            "dataset_kwargs": {"subset": subset, "archive": str(data / "gpqa" / "gpqa.zip")},
        }
        text = yaml.safe_dump(config, sort_keys=False) + "custom_dataset: !function memgen_local_data.gpqa\n"
        (out / f"{subset}_zeroshot_local.yaml").write_text(text)
    (out / "memgen_local_data.py").write_text(
        '"""Written by memgen.harness.tasks: GPQA from its zip, in memory."""\n\n'
        "from memgen.harness.tasks import gpqa_dataset as gpqa  # noqa: F401\n"
    )
    return out


def gpqa_dataset(subset: str = "gpqa_diamond", archive: str = "", **_metadata):
    """A DatasetDict with one ``train`` split (the stock task's only split) read from the password-protected zip."""
    import datasets

    if not archive or not os.path.exists(archive):
        raise FileNotFoundError(f"GPQA archive not found: {archive!r} (expected <data>/gpqa/gpqa.zip)")
    with zipfile.ZipFile(archive) as z:
        raw = z.read(f"gpqa/{subset}.csv", pwd=GPQA_PASSWORD).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(raw)))
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
