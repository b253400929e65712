"""`aura serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE by sse-starlette).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streaming and not), ``POST /v1/embeddings``, ``GET /v1/memory`` (what the episodic memory holds
and what the last reply retrieved), ``GET /health`` (never needs the key; 503 once the model's
engine has stopped) and the chat page at ``GET /``. Decisions, where OpenAI's API leaves room:

- Errors are OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a request
  that does not validate (malformed JSON and wrong types included), 401 for a missing or wrong
  key (``Authorization: Bearer KEY``), 413 for a body over ``max_body_bytes``, 404 for an
  unknown model name, 503 while shutting down. Never a 500 for bad input.
- A prompt longer than the model's context is cut from the left (its newest
  ``max_context`` tokens are what the model sees, as `aura generate` does); ``usage`` still
  counts the whole prompt. Generation past the context slides the window the same way.
- ``max_tokens`` above the server's ``max_tokens_limit`` is a 400 (not silently clamped);
  without one, ``default_max_tokens``. ``n`` must be 1. ``top_k`` and ``repetition_penalty``
  are accepted as extras. ``stop`` (string or list, up to 4) is honoured across token
  boundaries: the text is held back while it could still be the start of a stop string.
- Chat messages become a prompt through ``template.ChatTemplate`` (documented there).
- A client that disconnects cancels its generation at the next token.
- The model runs in a process of its own on Linux (``engine.EngineProcess``, ``--engine
  thread`` keeps it in this one): the event loop and the model worker then do not share a GIL.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError
from aura.infer.completion_store import CompletionStore
from aura.infer.embeddings import text_embedder
from aura.infer.engine import Engine, EngineKind, Generation, start_engine
from aura.infer.memory_flags import forward_mode
from aura.infer.sampling import SamplingConfig
from aura.infer.template import ChatTemplate
from aura.models.base import AuraModel


@dataclass
class ServeOptions:
    """What `aura serve` is told; the CLI fills it from its flags."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    model_name: str = "aura"
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    memory_dir: Path | None = None
    memory_mode: str = "read"  # off | read | write (aura.infer.memory_flags)
    embeddings: str = "hidden"  # hidden | encoder | encoder:NAME (aura.infer.embeddings)
    store_dir: Path | None = None  # stored chat completions (aura.infer.completion_store)
    save_interval: float = 30.0
    template: ChatTemplate = field(default_factory=ChatTemplate)
    engine: EngineKind = "auto"  # the model in a process of its own, or a thread (engine.py)
    threads: int | None = None  # the model's torch threads (None: as this process is)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status)


# --- requests --------------------------------------------------------------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use are ignored

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[_Message]
    store: bool = False  # keep it for /v1/chat/completions/{id} (completion_store)
    metadata: dict[str, str] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


# --- the body limit and the key --------------------------------------------------------------


class BodyLimit:
    """413 for a request body over ``limit`` bytes, by Content-Length or as it streams in
    (plain ASGI, so the error reaches the app's handlers as itself, in OpenAI's format)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error_response(413, f"request body over {self.limit} bytes")(
                scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI passes an HTTPException through as it is
                    raise StarletteHTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


class ApiKey:
    """401 for a /v1 request without ``Authorization: Bearer KEY`` (plain ASGI)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await error_response(401, "invalid or missing API key (Authorization: Bearer "
                                     "KEY)", code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------


class Service:
    """The engine (model, worker, memory) and what the routes share besides it."""

    def __init__(self, model: AuraModel, tokenizer: Tokenizer, options: ServeOptions):
        self.tokenizer, self.options = tokenizer, options
        self.embedder = text_embedder(options.embeddings, model)
        self.store = CompletionStore(options.store_dir)
        self.writes = options.memory_mode == "write"
        self.has_memory = options.memory_dir is not None or self.writes
        self.engine = start_engine(options.engine, functools.partial(
            Engine, model, tokenizer, forward_mode(options.memory_mode), options.memory_dir,
            self.writes, options.save_interval), options.threads,
            next((p.device for p in model.parameters()), "cpu"))
        self.created = int(time.time())

    def close(self) -> None:
        """Stop the engine (cancelling what runs); it persists the memory."""
        self.engine.close()

    # --- requests into jobs --------------------------------------------------------------------

    def sampling(self, req: _Sampling) -> tuple[SamplingConfig, int, list[str]]:
        if req.n != 1:
            raise OpenAIError(400, "only n=1 is supported", param="n")
        if req.model is not None and req.model != self.options.model_name:
            raise OpenAIError(404, f"the model {req.model!r} does not exist; this server has "
                              f"{self.options.model_name!r}", param="model",
                              code="model_not_found")
        limit = self.options.max_tokens_limit
        max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.options.default_max_tokens, limit)
        if max_tokens > limit:
            raise OpenAIError(400, f"max_tokens must be at most {limit}, got {max_tokens}",
                              param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(s == "" for s in stop):
            raise OpenAIError(400, "stop takes up to 4 non-empty strings", param="stop")
        try:
            cfg = SamplingConfig(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                 repetition_penalty=req.repetition_penalty, seed=req.seed)
        except AuraError as exc:
            raise OpenAIError(400, str(exc)) from None
        return cfg, max_tokens, stop

    def check_prompt(self, prompt: str) -> None:
        """Refuse (400) a prompt the tokenizer cannot encode, before any response starts."""
        try:
            ids = self.tokenizer.encode(prompt)
        except AuraError as exc:
            raise OpenAIError(400, str(exc), param="prompt") from None
        if len(ids) == 0 and self.tokenizer.eot_id is None:
            raise OpenAIError(400, "the prompt is empty and the tokenizer has no end-of-text "
                              "token to start from", param="prompt")

    def chat_prompt(self, req: ChatRequest) -> tuple[str, str]:
        """(prompt, last user message)."""
        if not req.messages:
            raise OpenAIError(400, "messages must not be empty", param="messages")
        turns = [("system" if m.role == "developer" else m.role, m.text())
                 for m in req.messages]
        last_user = next((t for r, t in reversed(turns) if r == "user"), "")
        return self.options.template.render(turns), last_user


class Events:
    """One request's events on the event loop: what arrived since its reader last looked.

    An ``asyncio.Queue`` costs a dozen calls per event (its put, get, empty checks and wake-up
    bookkeeping); a request's reader wants everything that has arrived at once anyway (a stream
    that fell behind sends it as one chunk). Here ``put`` appends and wakes the reader only when
    it is waiting, and ``take`` hands over the whole list."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: dict[str, Any]) -> None:
        """On the event loop's thread (``Mailbox`` delivers)."""
        self._items.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list[dict[str, Any]]:
        """Every event not taken yet, oldest first; waits for one if there is none."""
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class Mailbox:
    """Events from the worker thread to the event loop with one wake-up per round of them.

    ``call_soon_threadsafe`` per token per request writes to the loop's self-pipe and runs a
    callback each time; a round of 32 sequences would cost 32 of each. Here ``post`` only
    queues, and the worker calls ``flush`` once a round, after every sequence's text is out and
    before the round's forward (``Worker.on_flush``): the woken loop frames and sends the chunks
    while the forward's torch ops run without the GIL, instead of taking the GIL from the
    worker's per-sequence Python in the middle of the round.

    No lock: a deque's append and popleft are atomic, and the delivery clears ``_scheduled``
    before it drains, so an event flushed while it runs is either drained by it or schedules the
    next.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque[tuple[Events, dict[str, Any]]] = collections.deque()
        self._scheduled = False
        self.closed = False

    def post(self, queue: Events, event: dict[str, Any]) -> None:
        """Queue ``event`` for ``queue`` (delivered at the next ``flush``); RuntimeError once
        the loop has closed."""
        if self.closed:
            raise RuntimeError("the event loop has closed")
        self._items.append((queue, event))

    def flush(self) -> None:
        """Have the loop deliver what is queued (one wake-up, unless one is pending)."""
        if not self._items or self._scheduled:
            return  # nothing new, or a delivery is scheduled and will take it too
        self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.closed = True
            self._items.clear()

    def _deliver(self) -> None:
        self._scheduled = False
        items = self._items
        while items:
            queue, event = items.popleft()
            queue.put(event)


def sse_event(data: str) -> bytes:
    """``data`` (one line: JSON never holds a raw newline) as one SSE event, framed exactly as
    sse-starlette frames ``{"data": data}`` (its default separator, CRLF)."""
    return b"data: " + data.encode() + b"\r\n\r\n"


_json_string = json.encoder.encode_basestring_ascii  # json.dumps(str) without its dispatch


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def create_app(model: AuraModel, tokenizer: Tokenizer, options: ServeOptions) -> FastAPI:
    """The FastAPI app; its lifespan starts the worker and, at shutdown, stops it and saves."""
    service = Service(model, tokenizer, options)
    mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}

    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="aura", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(AuraError)
    async def _aura_error(request: Request, exc: AuraError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", ""
        return error_response(400, f"{where}: {message}" if where else message,
                              param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        if not service.engine.alive:  # what a load balancer's check needs to see
            return JSONResponse({"status": "error", "model": options.model_name,
                                 "message": "the model's engine has stopped"}, status_code=503)
        stats = service.engine.stats
        info = await memory_info()
        return {"status": "ok", "model": options.model_name, "active": stats.active,
                "queued": stats.queued, "completed": stats.completed,
                "cancelled": stats.cancelled, "failed": stats.failed,
                "memory": info["describe"] if info else None}

    async def memory_info() -> dict[str, Any] | None:
        if not service.has_memory:
            return None
        try:
            return await asyncio.wrap_future(service.engine.call("memory_info"))  # type: ignore[no-any-return]
        except AuraError:  # the engine has stopped
            return None

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": options.model_name, "object": "model",
                                            "created": service.created, "owned_by": "aura"}]}

    @app.get("/v1/memory")
    async def memory() -> dict[str, Any]:
        info = await memory_info()
        if info is None:
            return {"enabled": False, "retrieved": []}
        return {"enabled": True, **info}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> Response:
        sampling, max_tokens, stop = service.sampling(req)
        prompt, last_user = service.chat_prompt(req)
        stop = stop + [s for s in options.template.stop() if s not in stop]
        stored = ([{"role": m.role, "content": m.text()} for m in req.messages] if req.store
                  else None)
        return await _complete(request, req, prompt, sampling, max_tokens, stop, chat=True,
                               last_user=last_user, stored=stored)

    def _not_stored(cid: str) -> OpenAIError:
        return OpenAIError(404, f"no stored chat completion {cid!r}", param="completion_id",
                           code="not_found")

    def _page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
        return {"object": "list", "data": items, "has_more": more,
                "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None}

    def _paging(request: Request) -> tuple[str | None, int, str]:
        q = request.query_params
        order = q.get("order", "asc")
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            limit = -1
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise OpenAIError(400, "order must be asc or desc and limit in 1..100")
        return q.get("after"), limit, order

    @app.get("/v1/chat/completions")
    async def stored_list(request: Request) -> dict[str, Any]:
        after, limit, order = _paging(request)
        metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                    if k.startswith("metadata[") and k.endswith("]")}
        return _page(*service.store.list(after, limit, order, metadata))

    @app.get("/v1/chat/completions/{cid}")
    async def stored_get(cid: str) -> dict[str, Any]:
        completion = service.store.get(cid)
        if completion is None:
            raise _not_stored(cid)
        return completion

    @app.get("/v1/chat/completions/{cid}/messages")
    async def stored_messages(cid: str, request: Request) -> dict[str, Any]:
        after, limit, order = _paging(request)
        messages = service.store.messages(cid)
        if messages is None:
            raise _not_stored(cid)
        if order == "desc":
            messages.reverse()
        ids = [m["id"] for m in messages]
        if after is not None:
            messages = messages[ids.index(after) + 1:] if after in ids else []
        return _page(messages[:limit], len(messages) > limit)

    @app.delete("/v1/chat/completions/{cid}")
    async def stored_delete(cid: str) -> dict[str, Any]:
        if not service.store.delete(cid):
            raise _not_stored(cid)
        return {"object": "chat.completion.deleted", "id": cid, "deleted": True}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        sampling, max_tokens, stop = service.sampling(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise OpenAIError(400, "prompt must be one string", param="prompt")
        return await _complete(request, req, prompts[0], sampling, max_tokens, stop, chat=False,
                               last_user=None)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise OpenAIError(400, "input must not be empty", param="input")
        if service.embedder is not None:
            if any(not t for t in texts):
                raise OpenAIError(400, "input texts must not be empty", param="input")
            try:
                vectors = await asyncio.to_thread(service.embedder.encode, texts)
            except AuraError as exc:  # the encoder's endpoint failed: not the client's fault
                raise OpenAIError(502, str(exc), "server_error") from None
            tokens = sum(len(service.tokenizer.encode(t)) for t in texts)
        else:
            vectors, tokens = await asyncio.wrap_future(service.engine.call("embed", texts))
        if req.encoding_format == "base64":  # little-endian float32, as OpenAI's client reads
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                       for v in vectors]
        return {"object": "list", "model": options.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_asset("index.html"))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        types = {"js": "text/javascript", "css": "text/css"}
        kind = types.get(name.rsplit(".", 1)[-1])
        if kind is None or "/" in name or name.startswith("."):
            return error_response(404, "not found")
        try:
            return Response(_asset(name), media_type=kind)
        except FileNotFoundError:
            return error_response(404, "not found")

    async def _complete(request: Request, req: _Sampling, prompt: str, sampling: SamplingConfig,
                        max_tokens: int, stop: list[str], *, chat: bool,
                        last_user: str | None,
                        stored: list[dict[str, str]] | None = None) -> Response:
        service.check_prompt(prompt)
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.get(loop)
        if mailbox is None:
            mailbox = mailboxes[loop] = Mailbox(loop)
            service.engine.on_flush(mailbox.flush)
        events = Events()
        submitted: list[Any] = []  # the job, once submitted (emit may run before that returns)

        def emit(event: dict[str, Any]) -> None:
            try:
                mailbox.post(events, event)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                for job in submitted:
                    job.cancel()

        remember = None
        if service.has_memory and chat:
            try:
                await asyncio.wrap_future(service.engine.call("recall", last_user or ""))
            except AuraError as exc:  # only when the engine has stopped
                raise OpenAIError(503, str(exc), "server_error") from None
            if service.writes:
                t = options.template
                remember = f"{t.user} {last_user}{t.turn_end}{t.assistant} "
        try:
            job = service.engine.submit(Generation(prompt, max_tokens, sampling, tuple(stop),
                                                   req.stream, remember), emit)
        except AuraError as exc:
            raise OpenAIError(503, str(exc), "server_error") from None
        submitted.append(job)
        rid = _new_id("chatcmpl" if chat else "cmpl")
        obj = "chat.completion" if chat else "text_completion"
        model_name = options.model_name

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        def usage(done: dict[str, Any]) -> dict[str, int]:
            p, c = done["prompt_tokens"], done["completion_tokens"]
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def whole(done: dict[str, Any], created: int) -> dict[str, Any]:
            """The completion object of a finished request (stored when it asked to be)."""
            text = done["text"]
            message = ({"message": {"role": "assistant", "content": text}} if chat
                       else {"text": text})
            body = {"id": rid, "object": obj, "created": created, "model": model_name,
                    "choices": [{"index": 0, **message, "logprobs": None,
                                 "finish_reason": done["done"]}],
                    "usage": usage(done)}
            if stored is not None:
                store_it(body)
            return body

        def store_it(body: dict[str, Any]) -> None:
            assert stored is not None and isinstance(req, ChatRequest)
            try:
                service.store.put(body, stored, req.metadata)
            except OSError as exc:  # the reply is delivered; the store's failure is logged
                print(f"aura serve: cannot store {rid}: {exc}", file=sys.stderr, flush=True)

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            created = int(time.time())  # one request's chunks share it, as OpenAI's do

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
                body = {"id": rid, "object": chunk_obj, "created": created,
                        "model": model_name, "choices": choices, **extra}
                return sse_event(json.dumps(body))

            # A text chunk is these bytes around the JSON string of its text, already framed as
            # an SSE event (what sse-starlette would make of ``{"data": ...}``): per chunk, one
            # string escape and one encode, no dict, whole-body encoding or event object.
            marker = secrets.token_hex(8)
            head, tail = chunk([choice(marker, None)]).split(json.dumps(marker).encode())

            async def stream():  # type: ignore[no-untyped-def]
                try:
                    if chat:
                        yield chunk([choice("", None, first=True)])
                    while True:
                        text = ""
                        for event in await events.take():
                            if "text" in event and "done" not in event:
                                text += event["text"]  # behind: what has come, in one chunk
                                continue
                            if text:
                                yield head + _json_string(text).encode() + tail
                                text = ""
                            if "done" in event:
                                if stored is not None:
                                    whole(event, created)
                                yield chunk([choice(None if chat else "", event["done"])])
                                if include_usage:
                                    yield chunk([], usage=usage(event))
                                yield sse_event("[DONE]")
                            else:
                                body = {"error": {"message": event["error"], "param": None,
                                                  "type": "server_error", "code": None}}
                                yield sse_event(json.dumps(body))
                            return
                        if text:
                            yield head + _json_string(text).encode() + tail
                finally:
                    job.cancel()  # a no-op when finished; stops it when the client left

            return EventSourceResponse(stream(), ping=15)

        while True:
            try:
                event = (await asyncio.wait_for(events.take(), timeout=0.25))[-1]
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
                continue
            if "done" in event:
                break
            if "error" in event:
                job.cancel()
                return error_response(503 if "shutting down" in event["error"] else 500,
                                      event["error"], "server_error")
        return JSONResponse(whole(event, int(time.time())))

    if options.api_key is not None:
        app.add_middleware(ApiKey, key=options.api_key)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=options.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    return app


def _asset(name: str) -> str:
    return resources.files("aura.infer").joinpath("web", name).read_text(encoding="utf-8")


class _Server:
    """uvicorn's server, remembering the signal that stopped it (for the exit code).

    uvicorn shuts down gracefully on SIGINT/SIGTERM (lifespan shutdown: the worker stops, the
    memory is saved), then raises the signal again for the handler that was there before it;
    that handler is ours and only records it, so the command can exit 128 + signal."""

    def __init__(self, app: FastAPI, options: ServeOptions):
        import uvicorn

        self.signal: int | None = None
        config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                                timeout_graceful_shutdown=5, lifespan="on")
        self.server = uvicorn.Server(config)

    def _record(self, sig: int, frame: Any) -> None:
        self.signal = sig

    def run(self) -> int | None:
        previous = {s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.server.run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.signal


def serve(model: AuraModel, tokenizer: Tokenizer, options: ServeOptions,
          log: Any = print) -> int | None:
    """Run until SIGINT/SIGTERM; returns the signal number that stopped it (None otherwise)."""
    app = create_app(model, tokenizer, options)
    log(f"aura serve: {options.model_name} on http://{options.host}:{options.port} "
        f"(OpenAI API under /v1, chat page at /)")
    return _Server(app, options).run()
