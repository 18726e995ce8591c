"""``/metrics``: the engine's and the server's counters in Prometheus' text format (no client library needed)."""

from __future__ import annotations

METRICS = [
    # name, type, help, how to read it from (engine counters c, engine load q, server state s)
    ("memgen_requests_total", "counter", "engine requests admitted to the queue", lambda c, q, s: c["requests"]),
    ("memgen_requests_finished_total", "counter", "engine requests finished", lambda c, q, s: c["finished"]),
    (
        "memgen_requests_cancelled_total",
        "counter",
        "engine requests cancelled (client gone)",
        lambda c, q, s: c["cancelled"],
    ),
    (
        "memgen_requests_failed_total",
        "counter",
        "engine requests failed by a decode error",
        lambda c, q, s: c["failed"],
    ),
    ("memgen_prompt_tokens_total", "counter", "prompt tokens prefilled", lambda c, q, s: c["prompt_tokens"]),
    ("memgen_generation_tokens_total", "counter", "tokens generated", lambda c, q, s: c["generated_tokens"]),
    ("memgen_trigger_decisions_total", "counter", "insertion decisions taken", lambda c, q, s: c["decisions"]),
    ("memgen_insertions_total", "counter", "insertions woven (prompt end included)", lambda c, q, s: c["insertions"]),
    ("memgen_latent_slots_total", "counter", "latent slots fed to the reasoner", lambda c, q, s: c["latent_slots"]),
    ("memgen_engine_steps_total", "counter", "engine steps", lambda c, q, s: c["steps"]),
    (
        "memgen_queue_length",
        "gauge",
        "requests waiting for rows or being prefilled",
        lambda c, q, s: q["waiting"] + q["prefilling"],
    ),
    ("memgen_running_rows", "gauge", "rows decoding now", lambda c, q, s: q["running_rows"]),
    (
        "memgen_invocation_rate",
        "gauge",
        "share of insertion decisions that wove (delimiters, and prompt ends the policy decides)",
        lambda c, q, s: c["invoked"] / c["decisions"] if c["decisions"] else 0.0,
    ),
    ("memgen_draining", "gauge", "1 once shutdown has begun", lambda c, q, s: int(s.draining)),
]


def prometheus_text(state) -> str:
    counters, load = dict(state.engine.counters), state.engine.load()
    lines = []
    for name, kind, text, read in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {read(counters, load, state)}"]
    name = "memgen_http_responses_total"
    lines += [f"# HELP {name} HTTP responses by status", f"# TYPE {name} counter"]
    lines += [f'{name}{{status="{status}"}} {count}' for status, count in sorted(state.responses.items())]
    return "\n".join(lines) + "\n"
