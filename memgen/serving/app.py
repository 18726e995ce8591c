"""The FastAPI application: OpenAI's routes over a :class:`memgen.continuous.ContinuousEngine`.

Each HTTP request becomes one engine request per prompt (a completion request may carry
several prompts); its ``n`` choices are that request's samples, which share one prefill. The
engine runs in its own thread and hands tokens to the request's asyncio queue. A client that
disconnects cancels its engine requests, whose rows are freed at the next engine step.

Errors are OpenAI's JSON body with these statuses: 400 malformed JSON or a request the model
cannot serve (context exceeded, unsupported parameter, no chat template); 401 a missing or
wrong API key; 404 an unknown model or route; 413 a body or prompt over the server's limits;
422 wrong types or out-of-range values (negative ``max_tokens``, unknown memory policy, empty
``messages``); 429 the queue is full; 503 the server is shutting down; 500 a failed decode step
(the engine goes on serving the other requests).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import GenerateConfig
from ..continuous import ContinuousEngine, EngineRequest, EngineStoppedError, QueueFullError
from ..data import Record, prompt_token_ids
from ..errors import MemGenError
from .config import ServeConfig
from .metrics import prometheus_text
from .schema import ApiError, ChatRequest, CompletionRequest, error_body
from .text import ChoiceText


class ServerState:
    """What the routes share: the model, its engine, the limits and the HTTP counters."""

    def __init__(self, model, engine: ContinuousEngine, config: ServeConfig, model_name: str, adapter: bool):
        self.model, self.engine, self.config = model, engine, config
        self.model_name, self.adapter = model_name, adapter
        self.tokenizer = model.tokenizer
        context = model.reasoner.context_length or 2**31
        self.max_model_len = min(config.max_model_len or context, context)
        self.max_prompt_tokens = config.max_prompt_tokens or self.max_model_len - 1
        self.draining = False
        self.created = int(time.time())
        self.responses: Counter = Counter()


def build_app(state: ServerState) -> FastAPI:
    """The ASGI app; the caller starts and stops ``state.engine`` (see :mod:`memgen.serving.server`)."""
    app = FastAPI(title="memgen", docs_url=None, redoc_url=None)
    app.state.memgen = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(state, exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(state, 400, "the request body is not valid JSON", "invalid_request_error", None)
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in errors[:5])
        return _error(state, 422, message or "invalid request", "invalid_request_error", where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(state, exc.status_code, str(exc.detail), kind, None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _error(state, 500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None)

    @app.get("/health")
    async def health():
        return {"status": "draining" if state.draining else "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(state), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "memgen",
                    "max_model_len": state.max_model_len,
                    "memgen": {"adapter": state.adapter, "default_memory": state.config.memory},
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(state, body.model)
        prompt = _chat_prompt(state, body)
        top = body.top_logprobs or 0
        return await _generate(
            state, request, body, [prompt], body.max_completion_tokens or body.max_tokens, True, body.logprobs, top
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = [_encode(state, p) for p in body.prompts()]
        top = body.logprobs or 0
        return await _generate(state, request, body, prompts, body.max_tokens, False, body.logprobs is not None, top)

    return app


def _error(state: ServerState, status: int, message: str, kind: str, param: str | None) -> JSONResponse:
    state.responses[status] += 1
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {state.model_name!r}",
            "not_found_error",
            "model",
        )


def _chat_prompt(state: ServerState, body: ChatRequest) -> list[int]:
    if not getattr(state.tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return prompt_token_ids(Record("", None, messages=messages), state.tokenizer, True)
    except Exception as exc:  # the template itself refuses the conversation (e.g. roles out of order)
        raise ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from None


def _encode(state: ServerState, prompt) -> list[int]:
    """Token ids of a completion prompt (text or ids), refusing empty prompts and ids outside the vocabulary."""
    try:
        return state.model.encode_prompts([prompt])[0]
    except MemGenError as exc:
        raise ApiError(400, str(exc), param="prompt") from None


def _generate_config(state: ServerState, body, prompt_len: int, max_tokens: int | None) -> GenerateConfig:
    cfg = state.config
    if max_tokens is None:
        max_tokens = state.max_model_len - prompt_len
    if prompt_len + max_tokens > state.max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {state.max_model_len} tokens; the prompt has {prompt_len} "
            f"and {max_tokens} more were requested",
            param="max_tokens",
        )
    memory = {"memory": cfg.memory, "max_insertions": cfg.max_insertions, "trigger_threshold": cfg.trigger_threshold}
    if body.memgen is not None:  # the request's own settings win; the rest are the server's or GenerateConfig's
        memory.update(body.memgen.model_dump(exclude_none=True))
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        return GenerateConfig(
            max_new_tokens=max_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=body.top_p or 1.0,
            top_k=max(0, body.top_k or 0),
            stop=body.stop or [],
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            num_samples=body.n,
            **memory,
        )
    except MemGenError as exc:
        raise ApiError(422, str(exc)) from None


async def _generate(
    state: ServerState, request: Request, body, prompts, max_tokens, chat: bool, logprobs: bool, top: int
):
    if state.draining:
        raise ApiError(503, "the server is shutting down", "service_unavailable")
    unsupported = body.unsupported()
    if unsupported:
        raise ApiError(400, f"{unsupported} is not supported by memgen; leave it at 0", param=unsupported)
    if body.n > state.config.max_n or body.n * len(prompts) > state.config.max_rows:
        limit = min(state.config.max_n, state.config.max_rows // len(prompts))
        raise ApiError(400, f"n={body.n} over {len(prompts)} prompt(s) is more than this server's {limit}", param="n")
    for ids in prompts:
        if len(ids) > state.max_prompt_tokens:
            raise ApiError(
                413,
                f"the prompt has {len(ids)} tokens; this server accepts at most {state.max_prompt_tokens}",
                param="prompt",
            )
    configs = [_generate_config(state, body, len(ids), max_tokens) for ids in prompts]

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    handles: list[EngineRequest] = []
    for p, (ids, config) in enumerate(zip(prompts, configs)):
        handles.append(
            EngineRequest(
                ids,
                config,
                on_event=lambda e, p=p: loop.call_soon_threadsafe(queue.put_nowait, ("token", p, e)),
                on_done=lambda r, p=p: loop.call_soon_threadsafe(queue.put_nowait, ("done", p, r)),
                logprobs=logprobs,
                top_logprobs=top,
            )
        )
    try:
        for handle in handles:
            state.engine.submit(handle)
    except QueueFullError as exc:
        _cancel(state, handles)
        raise ApiError(429, f"the server is busy: {exc}", "rate_limit_error") from None
    except EngineStoppedError as exc:
        _cancel(state, handles)
        raise ApiError(503, str(exc), "service_unavailable") from None
    except MemGenError as exc:
        _cancel(state, handles)
        raise ApiError(400, str(exc)) from None

    reply = _Reply(state, body, prompts, chat, logprobs)
    if body.stream:
        state.responses[200] += 1
        return _CancellingStream(
            reply.stream(queue, len(handles)), lambda: _cancel(state, handles), media_type="text/event-stream"
        )
    pending = len(handles)
    while pending:
        try:
            kind, p, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                _cancel(state, handles)
                return _error(state, 499, "client closed the request", "invalid_request_error", None)
            continue
        if kind == "token":
            reply.add(p, payload)
        else:
            pending -= 1
            if payload.error is not None:
                _cancel(state, handles)
                raise ApiError(500, f"decoding failed: {type(payload.error).__name__}: {payload.error}", "server_error")
    state.responses[200] += 1
    return reply.body()


def _cancel(state: ServerState, handles: list[EngineRequest]) -> None:
    unfinished = [h for h in handles if not h.done]
    for handle in unfinished:
        handle.cancel()
    if unfinished:
        state.engine.wake()


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its engine requests however it ends (a disconnect included)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Reply:
    """Accumulates one HTTP request's choices and writes them as OpenAI's response or chunks."""

    def __init__(self, state: ServerState, body, prompts, chat: bool, logprobs: bool):
        self.state, self.request, self.chat, self.logprobs = state, body, chat, logprobs
        self.n = body.n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.choices = [ChoiceText(state.tokenizer, body.stop or []) for _ in range(len(prompts) * body.n)]
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def add(self, prompt_index: int, event) -> tuple[int, str]:
        index = prompt_index * self.n + event.index
        choice = self.choices[index]
        choice.insertions.extend(event.insertions)
        if event.logprob is not None:
            choice.logprobs.append((event.token_id, event.logprob, event.top_logprobs))
        return index, choice.push(event.token_id, event.finish_reason)

    # ------------------------------------------------------------------ pieces
    def _memgen(self, insertions) -> dict:
        woven = [i for i in insertions if i.inserted]
        return {
            "insertions": [
                {"position": i.position, "p_invoke": i.probability}
                | ({"retrieved": i.retrieved} if i.retrieved is not None else {})  # with --experience
                for i in woven
            ],
            "declined": len(insertions) - len(woven),
        }

    def _token(self, token_id: int) -> str:
        return self.state.tokenizer.decode([token_id])

    def _logprobs(self, entries) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": self._token(t),
                        "logprob": lp,
                        "bytes": list(self._token(t).encode()),
                        "top_logprobs": [
                            {"token": self._token(a), "logprob": b, "bytes": list(self._token(a).encode())}
                            for a, b in (tops or [])
                        ],
                    }
                    for t, lp, tops in entries
                ]
            }
        offsets, at = [], 0
        for t, _, _ in entries:
            offsets.append(at)
            at += len(self._token(t))
        return {
            "tokens": [self._token(t) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{self._token(a): b for a, b in (tops or [])} for _, _, tops in entries],
            "text_offset": offsets,
        }

    def usage(self) -> dict:
        completion = sum(len(c.tokens) for c in self.choices)
        engine = self.state.engine
        slots = sum(
            engine.k_prompt if i.position == 0 else engine.k_infer  # position 0 is the prompt end
            for c in self.choices
            for i in c.insertions
            if i.inserted
        )
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "memgen": {
                "latent_slots": slots,
                "insertions": sum(1 for c in self.choices for i in c.insertions if i.inserted),
            },
        }

    # ------------------------------------------------------------------ whole response
    def body(self) -> dict:
        choices = []
        for index, c in enumerate(self.choices):
            text = c.text()
            entry = {"index": index, "finish_reason": c.finish_reason, "logprobs": self._logprobs(c.logprobs)}
            if self.chat:
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            entry["memgen"] = self._memgen(c.insertions)
            choices.append(entry)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    # ------------------------------------------------------------------ streaming
    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def stream(self, queue: asyncio.Queue, requests: int):
        if self.chat:
            yield self._chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(self.choices))
                ]
            )
        pending = requests
        while pending:
            kind, p, payload = await queue.get()
            if kind == "done":
                pending -= 1
                if payload.error is not None:
                    failure = error_body(f"decoding failed: {payload.error}", "server_error", None, 500)
                    yield f"data: {json.dumps(failure)}\n\n"
                    break
                continue
            index, delta = self.add(p, payload)
            if not delta and payload.finish_reason is None and not payload.insertions:
                continue
            entry = {"index": index, "logprobs": None, "finish_reason": self.choices[index].finish_reason}
            if self.logprobs and payload.logprob is not None:
                entry["logprobs"] = self._logprobs([(payload.token_id, payload.logprob, payload.top_logprobs)])
            if self.chat:
                entry["delta"] = {"content": delta} if delta else {}
            else:
                entry["text"] = delta
            if payload.insertions:
                entry["memgen"] = self._memgen(payload.insertions)
            yield self._chunk([entry])
        options = self.request.stream_options
        if options is not None and options.include_usage:
            yield self._chunk([], self.usage())
        yield "data: [DONE]\n\n"
