"""memgen inside EleutherAI's lm-evaluation-harness: one harness for vanilla and MemGen.

- :class:`memgen.harness.model.MemGenLM` is lm-eval's ``hf`` model (it subclasses ``HFLM``, so
  tokenisation, batching, chat templates and truncation are lm-eval's own) whose generation
  runs through memgen's engine and whose ``loglikelihood`` scores continuations under the
  memory policy (:mod:`memgen.forced`). Importing it registers ``--model memgen``.
- :mod:`memgen.harness.tasks` writes task overrides that point lm-eval's stock GSM8K and GPQA
  definitions at local files (this machine has no hub access), keeping their prompts,
  filters and metrics.
- ``memgen lm-eval ...`` is lm-eval's own command line with both in place.

lm-eval 0.4 discovers models only in its registry, with no plugin entry points, so
``--model memgen`` works wherever memgen's model module has been imported: through
``memgen lm-eval`` on the command line, or ``import memgen.harness.model`` in Python.
"""
