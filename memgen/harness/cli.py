"""``memgen lm-eval ...``: lm-eval's own command line with ``--model memgen`` and the local tasks in place.

Every lm-eval flag works as documented by lm-eval. memgen adds ``--data-dir`` (default
``$MEMGEN_DATA_DIR`` or ``../shared/data``), where the local task overrides read their files;
their directory is passed as ``--include_path`` unless one is given. Datasets are opened offline.
"""

from __future__ import annotations

import argparse
import os
import sys


def run(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data-dir", default=os.environ.get("MEMGEN_DATA_DIR", "../shared/data"))
    known, rest = pre.parse_known_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval.__main__ import cli_evaluate

        from . import model  # noqa: F401  (registers --model memgen)
        from .tasks import write_local_tasks
    except ImportError as exc:
        print(f"memgen: error: memgen lm-eval needs lm-eval: pip install 'memgen[lm-eval]' ({exc})", file=sys.stderr)
        return 2
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in rest) and rest[:1] not in (["ls"],):
        rest += ["--include_path", str(write_local_tasks(known.data_dir))]
    sys.argv = ["lm-eval", *rest]
    cli_evaluate()
    return 0
