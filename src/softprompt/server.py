"""An HTTP server: one frozen model, many soft-prompt adapters, requests batched across adapters.

    softprompt serve --model smollm2-135m-instruct \\
        --adapter sentiment=runs/sent/adapter --adapter summary=runs/sum/adapter
    curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "summary", "prompt": "...", "max_tokens": 32, "temperature": 0}'

The API follows OpenAI's (``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET
/v1/models``; ``stream: true`` as server-sent events, ``logprobs``, ``echo``), with ``"model"``
naming the adapter (``"base"`` or the base model's name: no adapter). Classification
adapters also answer ``POST /v1/classify``; ``POST /v1/adapters`` and ``DELETE
/v1/adapters/{name}`` load and unload adapters while the server runs. See docs/serving.md.

Design. The engine (rows, adapters, scheduling: :mod:`softprompt.engine`) has no HTTP; this
module is the FastAPI layer: request models, OpenAI bodies, server-sent events, errors as
status codes. Requests are validated and tokenized on the event loop, then queued as rows (one
per prompt). One worker thread runs the model: classification and scoring rows as ONE model
call per kind with ``adapter_names=[...]``; generation rows join the running batch at the next
decode step (``--scheduling step``, continuous batching: their prefill is one forward, then
they decode beside the rows already running, each with its own adapter, sampling settings and
stop rule, and leave as soon as they finish). A failing call is retried row by row, so one bad
row fails alone.

Shutdown (``Engine.drain``, on SIGTERM/SIGINT in ``softprompt serve``): no new rows are taken,
rows in flight get ``graceful_timeout`` seconds to finish, then what remains is cancelled
(answered 503) and ``generate`` stops at its next decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .chat import ROLES
from .engine import (  # noqa: F401  (re-exported: the engine's names as they were here)
    BASE_ALIAS,
    COMPOSE,
    NAME_RE,
    SCHEDULING,
    AdapterEntry,
    Cancelled,
    Engine,
    EngineError,
    GenerationRow,
    ServeSettings,
    _Row,
    _RowSampler,
    _RowStops,
    classify_rows,
    eos_ids,
    generate_rows,
    prompt_logprobs,
    token_entry,
)
from .ensemble import COMBINE, combine_probs, majority
from .errors import SoftPromptError, require
from .tasks import pad_id  # noqa: F401

try:  # handlers' signatures name it (fastapi resolves them in this module); an extra: "serve"
    from starlette.requests import Request
except ImportError:  # create_app says what to install
    Request = None

log = logging.getLogger("softprompt.server")

API_KEY_ENV = "SOFTPROMPT_API_KEY"

STATUS = {
    "invalid": 400,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "busy": 429,
    "closed": 499,
    "internal": 500,
    "unavailable": 503,
}


class ServeError(EngineError):
    """An error answered to one request: HTTP status, message, OpenAI error type and code."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        409: "conflict_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        499: "client_closed",
        503: "service_unavailable",
    }

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        kind = next((k for k, s in STATUS.items() if s == status), "internal")
        super().__init__(kind, message, code, param)
        self.status = status
        self.headers = headers or {}

    @classmethod
    def of(cls, err: EngineError) -> ServeError:
        """The HTTP answer to an engine error (its kind as a status code)."""
        if isinstance(err, ServeError):
            return err
        headers = {} if err.retry_after is None else {"Retry-After": str(err.retry_after)}
        return cls(STATUS[err.kind], err.message, err.code, err.param, headers)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(
                    self.status, "invalid_request_error" if self.status < 500 else "server_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit integer


def _utf8_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate at character {e.start} (send UTF-8 text)"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_utf8_text)]  # a str that is valid Unicode (no surrogates)


MAX_TOP_LOGPROBS = 20
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request checks for its client


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """What both generation endpoints take: the adapter, sampling, stopping, streaming."""

    model_config = _STRICT
    model: Text | list[Text]  # a list: a prompt ensemble (adapters of one task)
    combine: Text | None = None  # an ensemble's combination: "vote" (default) or "mean"
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # OpenAI fields accepted only at their neutral values
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[Text, float] | None = None


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` (OpenAI's completions API; extensions: ``use_template``)."""

    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    use_template: bool = True
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI fields accepted only at their neutral values
    best_of: int | None = None
    suffix: None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None


CHAT_ROLES = ("developer", *ROLES)  # developer: OpenAI's newer name for system


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions`` (OpenAI's chat completions API)."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI fields accepted at the values that change nothing (check_chat_options)
    response_format: dict[Text, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Text | dict[Text, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[Text, Text] | None = None


def check_chat_options(req: ChatCompletionRequest) -> None:
    """400 naming the field for chat options this server cannot honour: tool calling, JSON
    mode, stored completions. Their neutral values (no tools, ``tool_choice`` "none",
    ``response_format`` text, ``store`` false, any ``metadata``) are accepted."""
    if req.tools:
        raise ServeError(
            400,
            "tools: tool calling is not supported by this server; send [] or leave it out",
            "unsupported_parameter",
            "tools",
        )
    if req.tool_choice not in (None, "none", "auto"):  # "auto" without tools: no tool call
        raise ServeError(
            400,
            f"tool_choice: {req.tool_choice!r} needs tool calling, which this server does not "
            'support; send "none" or leave it out',
            "unsupported_parameter",
            "tool_choice",
        )
    if req.response_format is not None:
        kind = req.response_format.get("type")
        if kind != "text":
            raise ServeError(
                400,
                f"response_format: type {kind!r} needs JSON mode, which this server does not "
                'support; send {"type": "text"} or leave it out',
                "unsupported_parameter",
                "response_format",
            )
    if req.store:
        raise ServeError(
            400,
            "store: this server does not store completions; send false or leave it out",
            "unsupported_parameter",
            "store",
        )


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """``[{"role", "content"}]`` from a request's messages; 400 naming the message at fault."""
    if not messages:
        raise ServeError(400, "messages: give at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if m.role not in CHAT_ROLES:
            raise ServeError(
                400,
                f"{where}.role: unknown role {m.role!r}; expected one of {list(CHAT_ROLES)}",
                param=f"{where}.role",
            )
        content = m.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text" or p.text is None]
            if bad:
                raise ServeError(
                    400,
                    f"{where}.content: only text parts are supported, got {bad[0]!r}",
                    param=f"{where}.content",
                )
            content = "".join(p.text for p in content)
        if content is None:
            raise ServeError(
                400,
                f"{where}.content: a {m.role} message needs content (a string)",
                param=f"{where}.content",
            )
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: one input (text, or an object of template fields) or a list;
    ``model`` one classification adapter, or a list of adapters of one task (a prompt
    ensemble, combined by ``combine``: "mean" probability or majority "vote")."""

    model_config = _STRICT
    model: Text | list[Text]
    input: Text | dict[Text, Text] | list[Text | dict[Text, Text]]
    combine: Text = "mean"
    user: Text | None = None


class AdapterRequest(BaseModel):
    """``POST /v1/adapters``."""

    model_config = _STRICT
    name: Text
    path: Text


class _Guard:
    """ASGI middleware run before any parsing: bearer token (401) and body size (413)."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path") != "/health":
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return await _send_json(
                    send,
                    ServeError(
                        401,
                        "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        "invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_json(send, ServeError(400, "bad Content-Length header"))
            if int(length) > self.max_body:
                return await _send_json(send, self._too_large())
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a chunked body (FastAPI turns any other
                    # exception raised while it reads the body into a 400)
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> ServeError:
        return ServeError(
            413,
            f"request body is larger than this server's limit of {self.max_body} bytes "
            "(--max-body-bytes)",
            "request_too_large",
        )


async def _send_json(send, err: ServeError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|union|function-\w+)\[.*\])$")


def _validation_error(exc) -> tuple[str, str | None]:
    """pydantic's errors as (message, param). The message: ``field.sub: message`` per error;
    pydantic's union-member tags are left out, and where one member of a field's union gives a
    specific error, the others' "should be a valid <type>" are too. ``param``: the location the
    reported errors share (dot-joined; None when they point at different fields or the body)."""
    errors = [dict(e, loc=tuple(x for x in e.get("loc", ()) if x != "body")) for e in exc.errors()]
    specific = {e["loc"][:1] for e in errors if not str(e.get("type", "")).endswith("_type")}
    parts, locs = [], []
    for e in errors:
        if str(e.get("type", "")).endswith("_type") and e["loc"][:1] in specific:
            continue
        path = [str(x) for x in e["loc"] if not (isinstance(x, str) and _UNION_TAG.match(x))]
        loc = ["(key)" if x == "[key]" else x or '""' for x in path]
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', '')})")
            locs.append([])
            continue
        locs.append(path[: path.index("[key]")] if "[key]" in path else path)  # a key: its map
        if e.get("type") == "string_unicode":  # e.g. a field name with a lone surrogate
            shown = json.dumps(e.get("input"), ensure_ascii=True)[:80]
            parts.append(
                f"{'.'.join(loc) or 'body'}: {shown} is not valid Unicode text (a lone "
                "surrogate); send UTF-8 text"
            )
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    shared = os.path.commonprefix(locs) if locs else []  # the location every error lies under
    return "; ".join(dict.fromkeys(parts)), ".".join(shared) or None


def create_app(
    model,
    tokenizer,
    adapters: dict[str, str | Path] | None = None,
    settings: ServeSettings | None = None,
):
    """The FastAPI app serving ``model`` with ``adapters`` (name -> adapter folder).

    Args:
        model: a transformers model or a ``SoftPromptModel`` (adapters are added to it).
        tokenizer: its tokenizer.
        adapters: adapters to load at start; their parent folders are the default adapter roots.
        settings: limits and options (``ServeSettings``).

    Returns:
        The app; ``app.state.engine`` is its ``Engine``. The batching worker starts with the
        app's lifespan (or on the first request) and drains the queue at shutdown.

    Raises:
        SoftPromptError: an adapter that cannot be loaded.
    """
    require("fastapi", "serve", "softprompt serve")
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import softprompt as sp

    settings = settings or ServeSettings()
    adapters = dict(adapters or {})
    if not isinstance(model, sp.SoftPromptModel):
        model = sp.attach(model, tokenizer=tokenizer)
    if settings.adapter_roots is not None:
        roots = [Path(r) for r in settings.adapter_roots]
    else:
        roots = list(dict.fromkeys(Path(p).resolve().parent for p in adapters.values()))
    engine = Engine(model, tokenizer, settings, roots)
    for name, path in adapters.items():
        try:
            engine.load(name, path, check_root=False)
        except EngineError as e:
            raise SoftPromptError(f"--adapter {name}={path}: {e.message}") from e

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="softprompt", version=sp.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_Guard, api_key=settings.api_key, max_body=settings.max_body_bytes)

    def error_response(err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(EngineError)
    async def _serve_error(request: Request, exc: EngineError):
        return error_response(ServeError.of(exc))

    @app.exception_handler(SoftPromptError)
    async def _softprompt_error(request: Request, exc: SoftPromptError):
        return error_response(ServeError(400, str(exc), "invalid_request"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_error(exc)
        return error_response(ServeError(400, message, "invalid_request", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # kept: the headers the status carries (a 405's Allow, a 401's WWW-Authenticate)
        headers = dict(getattr(exc, "headers", None) or {})
        code = "request_too_large" if exc.status_code == 413 else None  # as by Content-Length
        return error_response(ServeError(exc.status_code, str(exc.detail), code, headers=headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(ServeError(500, f"internal error: {type(exc).__name__}: {exc}"))

    async def wait(futures: list, request: Request | None = None, rows: list[_Row] = ()) -> list:
        """The rows' results; 4xx/5xx for the first that failed. With ``request``: a client
        that goes away before the answer aborts ``rows``' generation (each ends at its next
        decode step, or is dropped while queued), as a streamed request's do."""
        gathered = asyncio.gather(
            *(asyncio.wrap_future(f) for f in futures), return_exceptions=True
        )
        watch = None
        if request is not None and any(r.gen is not None for r in rows):
            watch = asyncio.ensure_future(abort_on_disconnect(request, rows))
        try:
            results = await gathered
        finally:
            if watch is not None:
                watch.cancel()
        for r in results:
            if isinstance(r, BaseException):
                if isinstance(r, EngineError):
                    raise ServeError.of(r)
                if isinstance(r, SoftPromptError):
                    raise ServeError(400, str(r), "invalid_request")
                raise ServeError(500, f"internal error: {type(r).__name__}: {r}")
        return results

    async def abort_on_disconnect(request: Request, rows: list[_Row]) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        for r in rows:
            if r.gen is not None and r.gen.abort is not None:
                r.gen.abort.set()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.base_name, "adapters": len(engine.entries)}

    @app.get("/v1/stats")
    async def stats():
        return engine.snapshot()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": engine.models()}

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str):  # sync (the thread pool): "a+b" is composed on first use
        entry = engine.resolve(model_id)  # 404 naming "model" when unknown
        return engine.models()[0] if entry is None else entry.describe(engine.base_name)

    async def compose_first(model: str | list[str]) -> None:
        """Make the ``"a+b"`` compositions a request's ``model`` names before its checks, in
        the thread pool: composing takes the model lock, which a running ``generate`` call
        (``--scheduling batch``) holds for its whole length; on the event loop it would stall
        every other request until that call ends."""
        names = [model] if isinstance(model, str) else list(model)
        for k, name in enumerate(names):
            if isinstance(name, str) and COMPOSE in name and name not in engine.entries:
                try:
                    await run_in_threadpool(engine.resolve, name)
                except EngineError as e:  # name the list item at fault
                    e.param = "model" if isinstance(model, str) else f"model.{k}"
                    raise

    def check_unsupported(req) -> None:
        for name, ok in (
            ("best_of", getattr(req, "best_of", None) in (None, 1)),
            ("presence_penalty", req.presence_penalty == 0),
            ("frequency_penalty", req.frequency_penalty == 0),
            ("logit_bias", not req.logit_bias),
        ):
            if not ok:
                raise ServeError(400, f"{name} is not supported by this server", param=name)
        if not engine.can_generate:
            raise ServeError(400, "the base model is an encoder; it cannot generate text")

    def check_max_tokens(max_tokens: int) -> None:
        if max_tokens > settings.max_tokens_limit:
            raise ServeError(
                400,
                f"max_tokens is {max_tokens}; this server's limit is {settings.max_tokens_limit} "
                "(--max-tokens-limit)",
                "max_tokens_too_large",
                "max_tokens",
            )

    def parse_stop(value) -> tuple[str, ...]:
        stop = [value] if isinstance(value, str) else list(value or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ServeError(400, "stop: at most 4 non-empty strings", param="stop")
        return tuple(stop)

    def check_count(rows: int, n: int, param: str) -> None:
        if rows > settings.max_prompts:
            raise ServeError(
                400,
                f"{rows} completions ({rows // n} prompts x n={n}) exceed this server's limit "
                f"of {settings.max_prompts} per request",
                param=param,
            )

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def completion_logprobs(pairs: list[tuple[int, dict | None]], offset: int) -> dict:
        """OpenAI completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
        texts = engine.token_texts([i for i, _ in pairs])
        tops = engine.token_texts([t for _, e in pairs if e for t, _ in e["top"]])
        top_iter = iter(tops)
        out = {"tokens": texts, "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for text, (_, e) in zip(texts, pairs, strict=True):
            out["token_logprobs"].append(None if e is None else e["logprob"])
            out["top_logprobs"].append(
                None if e is None else {next(top_iter): lp for _, lp in e["top"]}
            )
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def result_pairs(r: dict) -> list[tuple[int, dict]]:
        """A generation result's (token, entry) pairs for ``completion_logprobs``: its tokens',
        then, as OpenAI gives it, the stop token's that ended it."""
        pairs = [(e["id"], e) for e in r["logprobs"]]
        if r.get("stop_logprob"):
            pairs.append((r["stop_logprob"]["id"], r["stop_logprob"]))
        return pairs

    def chat_logprobs(entries: list[dict]) -> list[dict]:
        """OpenAI chat ``logprobs.content``: token, logprob, bytes, top_logprobs."""
        ids = [e["id"] for e in entries]
        top_ids = [t for e in entries for t, _ in e["top"]]
        texts, raw = engine.token_texts(ids + top_ids), engine.token_bytes(ids + top_ids)
        tops = iter(zip(texts[len(ids) :], raw[len(ids) :], strict=True))

        def one(text: str, data: bytes, lp: float) -> dict:
            return {"token": text, "logprob": lp, "bytes": list(data)}

        return [
            {
                **one(text, data, e["logprob"]),
                "top_logprobs": [one(*next(tops), lp) for _, lp in e["top"]],
            }
            for text, data, e in zip(texts[: len(ids)], raw[: len(ids)], entries, strict=True)
        ]

    def streamed(
        rows: list[_Row], chunk, finish_chunk, tail_chunks, with_stop_token=False, members=1
    ):
        """SSE of streamed rows: ``chunk(index, text, entries, finish_reason)`` per delta, then
        ``tail_chunks(completion_tokens)`` (usage), then ``[DONE]`` (``with_stop_token``: the
        last chunk's entries end with the stop token's, as completions give it). A client that goes away
        aborts its unfinished rows (they end at the next decode step). ``members`` > 1: a
        mean-probability ensemble, ``rows`` member-major; the first member's rows stream (every
        member decodes the same tokens), the others share their abort, and usage counts all."""
        from fastapi.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        others, rows = rows[len(rows) // members :], rows[: len(rows) // members]
        for i, r in enumerate(rows):

            def sink(event, i=i):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, event))
                except RuntimeError:  # the event loop is closed
                    pass

            r.sink = sink
        for k, r in enumerate(others):  # an ensemble's other members end with their streamed row
            r.gen.abort = rows[k % len(rows)].gen.abort

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            sent = [""] * len(rows)
            sent_entries = [0] * len(rows)
            left, completion_tokens = len(rows), 0
            try:
                for i in range(len(rows)):
                    first = finish_chunk(i)
                    if first is not None:
                        yield sse(first)
                while left:
                    i, (kind, payload) = await queue.get()
                    if kind == "delta":
                        text, entries = payload
                        sent[i] += text
                        sent_entries[i] += len(entries or ())
                        yield sse(chunk(i, text, entries, None))
                    elif kind == "done":
                        left -= 1
                        completion_tokens += payload["completion_tokens"]
                        rest = payload["text"][len(sent[i]) :]
                        entries = payload["logprobs"]
                        entries = None if entries is None else entries[sent_entries[i] :]
                        if entries is not None and with_stop_token and payload["stop_logprob"]:
                            entries = [*entries, payload["stop_logprob"]]
                        yield sse(chunk(i, rest, entries, payload["finish_reason"]))
                    else:
                        err = payload
                        if isinstance(err, EngineError):
                            err = ServeError.of(err)
                        elif isinstance(err, SoftPromptError):
                            err = ServeError(400, str(err), "invalid_request")
                        else:
                            err = ServeError(500, f"internal error: {type(err).__name__}: {err}")
                        yield sse(err.body())
                        break
                else:
                    for extra in tail_chunks(completion_tokens * members):
                        yield sse(extra)
                yield "data: [DONE]\n\n"
            finally:
                for r in rows:
                    if not r.done:
                        r.gen.abort.set()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def generation_row(
        req, member, ids, max_tokens, stop, top, seed_offset, stop_ids=None, group=None
    ):
        """One generation row of ``req`` through ``member`` (None: the base model); ``group``:
        its mean-probability ensemble."""
        gen = GenerationRow(
            ids=ids,
            adapter=None if member is None else member.name,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=stop,
            seed=None if req.seed is None else req.seed + seed_offset,
            stop_ids=stop_ids,
            logprobs=top,
            stream=req.stream,
            abort=threading.Event(),  # set when the client goes away (streamed or not)
            group=group,
        )
        return _Row("generate", member, ids, gen)

    def generation_members(req) -> list[AdapterEntry | None]:
        """The entries a generation request runs: its one ``model``, or for a list of adapters
        of one task, every one of them (a prompt ensemble: each member's output is a row of
        the same batch, the answer is their majority vote)."""
        if isinstance(req.model, str):
            if req.combine is not None:
                raise ServeError(
                    400,
                    "combine: needs a list of models (a prompt ensemble); got one model",
                    param="combine",
                )
            return [engine.resolve(req.model)]
        names = list(req.model)
        if len(names) < 2:
            raise ServeError(400, "model: an ensemble lists at least 2 adapters", param="model")
        if len(set(names)) < len(names):
            raise ServeError(400, "model: an adapter is listed twice", param="model")
        if req.combine not in (None, "vote", "mean"):
            raise ServeError(
                400,
                f"combine: {req.combine!r}: a generation ensemble combines by majority "
                '"vote" over its members\' texts or "mean" (every token from the mean of their '
                "next-token probabilities)",
                param="combine",
            )
        for field, bad in (
            ("stream", req.stream and req.combine != "mean"),
            ("n", req.n != 1),
            ("echo", getattr(req, "echo", False)),
            ("logprobs", req.logprobs not in (None, False) and req.combine != "mean"),
        ):
            if bad:
                extra = {
                    "logprobs": ' (combine "mean" gives the ensemble\'s)',
                    "stream": ' (combine "mean" streams the ensemble\'s text)',
                }.get(field, "")
                raise ServeError(
                    400,
                    f"{field}: not supported with an ensemble (a list of models){extra}",
                    param=field,
                )
        entries = []
        for k, name in enumerate(names):
            try:
                entry = engine.resolve(name)
            except EngineError as e:  # name the list item at fault
                e.param = f"model.{k}"
                raise
            if entry is None:
                raise ServeError(
                    400,
                    f"model.{k}: {name!r} is the base model; an ensemble lists adapters of one task",
                    param=f"model.{k}",
                )
            entries.append(entry)

        def task_of(e):
            return None if e.task is None else (e.task.spec.kind, e.task.spec.template)

        for k, e in enumerate(entries[1:], 1):
            if task_of(e) != task_of(entries[0]):
                raise ServeError(
                    400,
                    f"model.{k}: {e.name!r} is for another task than {entries[0].name!r} "
                    f"({task_of(e)} vs {task_of(entries[0])}); an ensemble's adapters share one "
                    "task",
                    param=f"model.{k}",
                )
        return entries

    def combined(req, entries, results: list[dict], count: int) -> list[tuple[dict, dict]]:
        """Per input i of ``count`` (results member-major: member k's answer to input i is
        ``results[k * count + i]``): the ensemble's result and its record (``combine`` mean:
        the members decoded one text together, the first member's result holds it and the
        mean distribution's log-probabilities; vote: the winning member's result)."""
        out = []
        for i in range(count):
            mine = [results[k * count + i] for k in range(len(entries))]
            if req.combine == "mean":
                out.append((mine[0], {"combine": "mean", "members": [e.name for e in entries]}))
                continue
            w, votes = majority([r["text"] for r in mine])
            record = {
                "combine": "vote",
                "winner": entries[w].name,
                "votes": votes,
                "members": [
                    {"model": e.name, "text": r["text"], "finish_reason": r["finish_reason"]}
                    for e, r in zip(entries, mine, strict=True)
                ],
            }
            out.append((mine[w], record))
        return out

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_unsupported(req)
        await compose_first(req.model)
        entries = generation_members(req)
        entry = entries[0]
        if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)):
            prompts = [req.prompt]  # one text, or one prompt of token ids
        else:
            prompts = list(req.prompt)
        if not prompts:
            raise ServeError(400, "prompt: give at least one prompt", param="prompt")
        check_count(len(prompts) * req.n * len(entries), req.n, "prompt")
        max_tokens = settings.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ServeError(
                400,
                "max_tokens: 0 generates nothing; it needs echo: true (the prompt's token "
                "log-probabilities)",
                param="max_tokens",
            )
        check_max_tokens(max_tokens)
        stop = parse_stop(req.stop)
        if req.echo and engine.model.info.is_encoder_decoder:
            raise ServeError(400, "echo: not supported on encoder-decoder models", param="echo")
        if req.stream and req.echo:
            raise ServeError(400, "echo is not supported with stream: true", param="echo")
        top = req.logprobs
        gens, scores, usage_prompt = [], [], 0
        mean = len(entries) > 1 and req.combine == "mean"
        groups = [uuid.uuid4().hex if mean else None for _ in prompts]  # one per prompt
        for member in entries:  # member-major rows: member k's prompt p is row k * P + p
            for p, group in zip(prompts, groups, strict=True):
                ids = engine.encode_completion(member, p, req.use_template)
                engine.check_context(member, ids, max_tokens)
                usage_prompt += sum(t >= 0 for t in ids)  # real tokens, once per prompt
                if req.echo:
                    scores.append(_Row("score", member, ids, top=top or 0))
                for _ in range(req.n if max_tokens else 0):
                    gens.append(
                        generation_row(
                            req, member, ids, max_tokens, stop, top, len(gens), group=group
                        )
                    )
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }
        if req.stream:
            offsets = [0] * len(gens)  # per choice: text_offset of its next token

            def chunk(i, text, entries, finish):
                lp = None
                if top is not None:
                    lp = completion_logprobs([(e["id"], e) for e in entries or []], offsets[i])
                    offsets[i] += sum(map(len, lp["tokens"]))
                choice = {"index": i, "text": text, "finish_reason": finish, "logprobs": lp}
                return {**head, "choices": [choice]}

            def tail(completion_tokens):
                opts = req.stream_options
                if opts is not None and opts.include_usage:
                    yield {**head, "choices": [], "usage": usage(usage_prompt, completion_tokens)}

            k = len(entries) if mean else 1
            response = streamed(gens, chunk, lambda i: None, tail, with_stop_token=True, members=k)
            engine.submit(gens, "prompt")
            return response
        results = await wait(engine.submit(scores + gens, "prompt"), request, gens)
        prompt_lps, results = results[: len(scores)], results[len(scores) :]
        if len(entries) > 1:
            choices = []
            for i, (r, record) in enumerate(combined(req, entries, results, len(prompts))):
                lp = None if top is None else completion_logprobs(result_pairs(r), 0)
                choices.append(
                    {
                        "index": i,
                        "text": r["text"],
                        "finish_reason": r["finish_reason"],
                        "logprobs": lp,
                        "ensemble": record,
                    }
                )
            completion_tokens = sum(r["completion_tokens"] for r in results)
            return {**head, "choices": choices, "usage": usage(usage_prompt, completion_tokens)}
        choices = []
        for i in range(len(prompts) * req.n):
            p = i // req.n
            r = (
                results[i]
                if max_tokens
                else {
                    "text": "",
                    "finish_reason": "length",
                    "token_ids": [],
                    "logprobs": [],
                    "completion_tokens": 0,
                }
            )
            text, lp = r["text"], None
            pairs = []
            if req.echo:
                real = [t for t in scores[p].ids if t >= 0]
                plain = isinstance(prompts[p], str) and (entry is None or not req.use_template)
                echo = prompts[p] if plain else engine._decode(real)
                text = echo + text
                pairs = list(zip(real, prompt_lps[p], strict=True))
            if top is not None:
                lp = completion_logprobs(pairs + result_pairs(r), 0)
            choices.append(
                {"index": i, "text": text, "finish_reason": r["finish_reason"], "logprobs": lp}
            )
        completion_tokens = sum(r["completion_tokens"] for r in results)
        return {**head, "choices": choices, "usage": usage(usage_prompt, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_unsupported(req)
        check_chat_options(req)
        await compose_first(req.model)
        if engine.model.info.is_encoder_decoder:
            raise ServeError(
                400, "model: chat completions need a decoder-only model", param="model"
            )
        entries = generation_members(req)
        messages = chat_messages(req.messages)
        check_count(req.n * len(entries), req.n, "n")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None:
            check_max_tokens(max_tokens)
        stop = parse_stop(req.stop)
        if req.top_logprobs is not None and not req.logprobs:
            raise ServeError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        encoded = [engine.encode_chat(member, messages) for member in entries]
        if max_tokens is None:  # as OpenAI's chat: until the answer ends, or the context is full
            left = [
                engine.context_left(m, ids) for m, (ids, _) in zip(entries, encoded, strict=True)
            ]
            known = [x for x in left if x is not None]
            # at least 1: a prompt that fills the context is check_context's 400 below
            max_tokens = max(1, min([settings.max_tokens_limit, *known]))
        rows, usage_prompt = [], 0
        group = uuid.uuid4().hex if len(entries) > 1 and req.combine == "mean" else None
        for member, (ids, stop_ids) in zip(entries, encoded, strict=True):  # ensemble: a row each
            engine.check_context(member, ids, max_tokens)
            usage_prompt += sum(t >= 0 for t in ids)
            rows += [
                generation_row(
                    req, member, ids, max_tokens, stop, top, len(rows) + i, stop_ids, group
                )
                for i in range(req.n)
            ]
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": None,
        }
        if req.stream:
            head["object"] = "chat.completion.chunk"

            def chunk(i, text, entries, finish):
                delta = {"content": text} if text or finish is None else {}
                lp = (
                    None
                    if top is None
                    else {"content": chat_logprobs(entries or []), "refusal": None}
                )
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}
                return {**head, "choices": [choice]}

            def first(i):
                choice = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                    "logprobs": None,
                }
                return {**head, "choices": [choice]}

            def tail(completion_tokens):
                opts = req.stream_options
                if opts is not None and opts.include_usage:
                    yield {**head, "choices": [], "usage": usage(usage_prompt, completion_tokens)}

            response = streamed(rows, chunk, first, tail, members=len(entries) if group else 1)
            engine.submit(rows, "messages")
            return response
        results = await wait(engine.submit(rows, "messages"), request, rows)
        picked = (
            combined(req, entries, results, 1) if len(entries) > 1 else [(r, None) for r in results]
        )
        choices = []
        for i, (r, record) in enumerate(picked):
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": r["text"], "refusal": None},
                "finish_reason": r["finish_reason"],
                "logprobs": None
                if top is None
                else {"content": chat_logprobs(r["logprobs"]), "refusal": None},
            }
            if record is not None:
                choice["ensemble"] = record
            choices.append(choice)
        completion_tokens = sum(r["completion_tokens"] for r in results)
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage(usage_prompt, completion_tokens),
        }

    def classifier(name: str, param: str):
        try:
            entry = engine.resolve(name)
        except EngineError as e:  # name the list item at fault
            e.param = param
            raise
        if entry is None or entry.task is None or entry.task.spec.kind != "classify":
            raise ServeError(
                400,
                f"{param}: {name!r} is not a classification adapter; see GET /v1/models (task)",
                param=param,
            )
        return entry

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        await compose_first(req.model)
        names = [req.model] if isinstance(req.model, str) else list(req.model)
        if not names:
            raise ServeError(400, "model: give at least one adapter", param="model")
        if len(set(names)) < len(names):
            raise ServeError(400, "model: an adapter is listed twice", param="model")
        entries = [
            classifier(n, "model" if isinstance(req.model, str) else f"model.{k}")
            for k, n in enumerate(names)
        ]
        labels = list(entries[0].task.spec.labels)
        for k, e in enumerate(entries[1:], 1):
            if list(e.task.spec.labels) != labels:
                raise ServeError(
                    400,
                    f"model.{k}: {e.name!r} has labels {list(e.task.spec.labels)}, "
                    f"{entries[0].name!r} has {labels}: an ensemble's adapters share one task",
                    param=f"model.{k}",
                )
        if req.combine not in COMBINE:
            raise ServeError(
                400,
                f"combine: {req.combine!r} is not one of {list(COMBINE)}",
                param="combine",
            )
        items = [req.input] if isinstance(req.input, str | dict) else list(req.input)
        if not items:
            raise ServeError(400, "input: give at least one input", param="input")
        if len(items) * len(entries) > settings.max_prompts:
            raise ServeError(
                400,
                f"{len(items)} inputs x {len(entries)} adapters exceed this server's limit of "
                f"{settings.max_prompts} rows (--max-prompts)",
                param="input",
            )
        # adapter-major: row k*n + i is input i through adapter k, all in one batch
        rows = [_Row("classify", e, engine.encode_classify(e, it)) for e in entries for it in items]
        results = await wait(engine.submit(rows, "input"))
        tokens = sum(sum(t >= 0 for t in r.ids) for r in rows)
        if len(entries) == 1:
            data = [{"index": i, **r} for i, r in enumerate(results)]
        else:
            import torch

            n = len(items)
            probs = torch.tensor(
                [
                    [[r["scores"][lb] for lb in labels] for r in results[k * n : (k + 1) * n]]
                    for k in range(len(entries))
                ]
            )  # (K, n, C)
            pred, mean = combine_probs(probs, req.combine)
            data = [
                {
                    "index": i,
                    "label": labels[int(pred[i])],
                    "scores": dict(zip(labels, mean[i].tolist(), strict=True)),
                    "members": {e.name: results[k * n + i]["label"] for k, e in enumerate(entries)},
                }
                for i in range(n)
            ]
        return {
            "id": f"clf-{uuid.uuid4().hex}",
            "object": "classification",
            "created": int(time.time()),
            "model": req.model,
            "combine": req.combine if len(entries) > 1 else None,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/v1/adapters", status_code=201)
    def load_adapter(req: AdapterRequest):  # sync: runs in the thread pool (disk, model lock)
        return engine.load(req.name, req.path).describe(engine.base_name)

    @app.delete("/v1/adapters/{name}")
    def unload_adapter(name: str):
        engine.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    return app


# --------------------------------------------------------------------------------------------
# CLI: softprompt serve
# --------------------------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRACE_MARGIN_S = 5.0  # uvicorn waits this much longer than --graceful-timeout


def _parse_adapter(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise SoftPromptError(f"--adapter takes NAME=DIR, got {value!r}")
    if not NAME_RE.match(name):
        raise SoftPromptError(
            f"--adapter {value}: name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return name, path


def settings_from_args(args) -> tuple[str, dict[str, str], ServeSettings]:
    """(model name, adapters name -> folder, settings) from ``softprompt serve`` flags."""
    from .io import read_adapter_config, recorded_base_model

    adapters = dict(_parse_adapter(v) for v in args.adapter or [])
    model_name = args.model
    if model_name is None:
        if not adapters:
            raise SoftPromptError("serve needs --model (or an --adapter that names its base model)")
        first = next(iter(adapters.values()))
        model_name = recorded_base_model(read_adapter_config(first), first)
    settings = ServeSettings(
        model_name=model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        adapter_roots=args.adapter_root,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_prompts=args.max_prompts,
        graceful_timeout=args.graceful_timeout,
        scheduling=args.scheduling,
    )
    return model_name, adapters, settings


def cmd_serve(args) -> int:
    """Load the model and adapters and serve until interrupted (SIGINT/SIGTERM: graceful)."""
    uvicorn = require("uvicorn", "serve", "softprompt serve")

    from .loading import load_base

    model_name, adapters, settings = settings_from_args(args)
    if args.host not in LOOPBACK and not settings.api_key:
        print(
            f"warning: serving on {args.host} without an API key; anyone who can reach this "
            f"port can use the model (set {API_KEY_ENV} or --api-key)",
            file=sys.stderr,
        )
    base, tok = load_base(model_name, args.dtype)
    app = create_app(base, tok, adapters, settings)
    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGINT/SIGTERM (a second one: cancel now)
            engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # the engine answers what is left at graceful_timeout (503); uvicorn's own cut-off
        # (a bare 500 to each open request) only backs it up
        timeout_graceful_shutdown=settings.graceful_timeout + GRACE_MARGIN_S,
    )
    Server(config).run()
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``softprompt serve`` on a subparsers object."""
    d = ServeSettings()
    p = subparsers.add_parser(
        "serve",
        help="serve adapters over HTTP (OpenAI-style completions, classify)",
        description=(
            "Serve one base model with many adapters; requests to different adapters are "
            "batched into one model call. See docs/serving.md."
        ),
    )
    p.add_argument(
        "--model",
        help="hub id, local folder or embedded asset (default: the first adapter's base model)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="an adapter to serve as NAME (repeatable); DIR: a softprompt or PEFT folder",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)",
    )
    p.add_argument(
        "--adapter-root",
        action="append",
        metavar="DIR",
        help="folder POST /v1/adapters may load from (repeatable; default: the --adapter parents)",
    )
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="rows per model call")
    p.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms, help="batching wait of the oldest row"
    )
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="rows waiting before 429")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit)
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts per request")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=60.0,
        help="seconds in-flight requests get to finish at shutdown (SIGTERM, Ctrl-C); then "
        "they are answered 503",
    )
    p.add_argument(
        "--scheduling",
        default=d.scheduling,
        choices=list(SCHEDULING),
        help="step: requests join and leave the running batch at decode-step boundaries "
        "(continuous batching; default); batch: each batch's generation runs to its end first",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p
