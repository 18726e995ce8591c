"""Which code in a completion gets run: fenced blocks, the block rule, signature completion.

The rule, in order:

1. Fenced blocks (```` ```python ````, ```` ```py ````, ```` ``` ````; an unclosed last fence
   runs to the end, since generation may stop at the closing fence) are collected.
2. Among them, the **last block that defines every required name** (``def``/``class``/
   assignment at top level) is the code; models often show usage or a first draft before
   the final version. If no block defines them all, the last block tagged python (else the
   last block) is the code, and the tests report the missing name.
3. Without fences the whole completion is the code.

BigCodeBench's "complete" split gives the model a signature and docstring to continue.
:func:`complete_program` treats the completion as the function's body unless the extracted
code defines the entry point itself, in which case that code replaces the stub and the
prompt's imports are kept above it. (bigcodebench sanitises with a tree-sitter pass that
keeps the entry point and what it depends on; we keep whole blocks instead, which runs
helper code a model wrote on purpose and needs no parser.)
"""

from __future__ import annotations

import ast
import re
import warnings

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language tag, code)`` of every fenced block, in order."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]


def defined_names(code: str) -> set[str]:
    """Top-level names a piece of code defines (empty when it does not parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in model code are the tests' business
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return set(re.findall(r"^(?:async\s+)?(?:def|class)\s+(\w+)", code, re.M))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def extract_code(text: str, required: list[str] | tuple[str, ...] = ()) -> str:
    """The code to run from a completion, by the rule in the module docstring."""
    blocks = fenced_blocks(text)
    if not blocks:
        return text.strip("\n")
    need = set(required)
    for _, code in reversed(blocks):
        if need and need <= defined_names(code):
            return code
    python = [code for tag, code in blocks if tag in ("python", "py", "python3")]
    return (python or [code for _, code in blocks])[-1]


def _import_lines(code: str) -> list[str]:
    return [line for line in code.splitlines() if re.match(r"(import|from)\s+\w", line)]


def complete_program(prompt: str, completion: str, entry_point: str) -> str:
    """A BigCodeBench "complete" program: the prompt (signature and docstring) plus the body, or the
    model's own full function below the prompt's imports."""
    code = extract_code(completion, [entry_point])
    if entry_point in defined_names(code):
        missing = [line for line in _import_lines(prompt) if line not in code]
        return "\n".join(missing + [code])
    return prompt + (code if fenced_blocks(completion) else completion)
