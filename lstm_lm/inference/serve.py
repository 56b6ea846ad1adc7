"""`lstm-lm serve`: a trained model over HTTP (FastAPI on uvicorn), with a web page at `/`.

    app = create_app(LanguageModel.load("runs/demo"))      # an ASGI app; or, from the shell:
    lstm-lm serve --checkpoint runs/demo --port 8000       # then open http://127.0.0.1:8000

    POST /v1/next      {"prompt": "...", "k": 5}                  the likeliest next words
    POST /v1/complete  {"prompt": "...", "words": 20, "temperature": 0, "top_k": null, "top_p": null, "seed": null}
    POST /v1/score     {"texts": ["...", ...], "per_token": false}  log-probability of each text
    POST /v1/trace     {"prompt": "...", "top_k": 3, "units": 12, "swap": {"word": "...", "other": "..."}}
                       gates, norms and guesses per token (and with a swap, how far apart the memories are)
    GET  /v1/model     the model's facts           GET /healthz    liveness
    GET  /docs         the OpenAPI page FastAPI makes

Every bad request gets a 4xx status and `{"error": "what is wrong"}`: malformed JSON
(400), a body over MAX_BODY_BYTES (413), missing fields, wrong types or values out
of range (422), a prompt the model cannot read or a request over its limits (400),
a missing or wrong access token (401). Unknown fields are refused, so that a
misspelt option is not silently ignored. Every answer is valid JSON (no NaN), and
bounded in size: at most MAX_SCORE_TOKENS tokens per /v1/score, MAX_TRACE_TOKENS per
/v1/trace. The API answers no filesystem paths.

Access: bound to a loopback address, the server is open to this machine's users;
bound beyond it (`--host 0.0.0.0`), it needs an access token, generated and printed
unless given (`--token`, or $LSTM_LM_TOKEN), as Jupyter does: a client sends it as
`Authorization: Bearer TOKEN`, or opens the page once at `/?token=TOKEN`, which sets
a cookie for the page's own requests. `--no-token` serves without, with a warning.

Concurrency: uvicorn runs one event loop; FastAPI runs these plain `def` endpoints
in its thread pool, so several requests can be in flight. Each request reads from
a memory (hidden state) of its own, and the model's weights are only ever read,
so no request can see another's state. On top of that, every use of the model
holds `ModelService.lock`: the model runs one piece of work at a time, so that
requests do not compete for the cores PyTorch's kernels run on (`lstm-lm serve
--threads`, 1 by default: the other cores are left to HTTP and JSON, which measured
faster). The lock is first come, first served (`FairLock`), and /v1/score takes it
once per slice of SLICE_TOKENS tokens, so a light request waits for one slice of a
heavy one, not for all of it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import ipaddress
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lstm_lm import __version__
from lstm_lm.arguments import field
from lstm_lm.errors import LSTMLMError, PromptError
from lstm_lm.inference.api import LanguageModel
from lstm_lm.writing import dumps

WEB = Path(__file__).parent / "web"  # index.html, app.js, style.css: no build step
MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_PROMPT_CHARS = 10_000  # and at most sample.MAX_PROMPT_TOKENS tokens
MAX_TEXTS = 1000  # texts per /v1/score request
MAX_SCORE_TOKENS = 20_000  # tokens per /v1/score request: bounds its work and its answer
MAX_TRACE_TOKENS = 200  # tokens per /v1/trace prompt: each adds a few KB to the answer
SLICE_TOKENS = 2048  # /v1/score's work per turn of the model's lock
TOKEN_COOKIE = "lstm_lm_token"


class _Request(BaseModel):
    # strict: "5" is not a number and 5 is not a string; forbid: {"topk": 3} is an error
    model_config = ConfigDict(strict=True, extra="forbid")


Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The text so far.")


# The bounds of each field are the API's (arguments.py), tightened where the server caps them.
class NextRequest(_Request):
    prompt: str = Prompt
    k: int = field("k", 5, "How many words.", le=100)


class CompleteRequest(_Request):
    prompt: str = Prompt
    words: int = field("words", 20, "Stop after this many words (or at the sentence's end).", le=200)
    temperature: float = field("temperature", 0.0, "0: greedy; above 0: sample.", le=100.0)
    top_k: int | None = field("top_k", None, "Sample from the K likeliest tokens.")
    top_p: float | None = field("top_p", None, "Sample from the smallest set holding P.")
    seed: int | None = field("seed", None, "Seed for repeatable sampling.")


class ScoreRequest(_Request):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS, description="Texts, each scored as a sentence.")
    per_token: bool = Field(False, description="Also each token's log-probability.")


class Swap(_Request):
    word: str = Field(min_length=1, max_length=200, description="A word of the prompt.")
    other: str = Field(min_length=1, max_length=200, description="The word to read in its place.")


class TraceRequest(_Request):
    prompt: str = Prompt
    top_k: int = field("k", 3, "Next-word guesses per token.", le=20)
    units: int = Field(12, ge=1, le=64, description="Units per heatmap: those that change most.")
    swap: Swap | None = Field(
        None,
        description="Also read the prompt with `other` for `word`, and say how far "
        "apart the two memories are after each token.",
    )


class Error(BaseModel):
    error: str = Field(description="What is wrong with the request.")


ERRORS = {
    code: {"model": Error, "description": what}
    for code, what in [
        (400, "Malformed JSON, a prompt the model cannot read, or a request over the limits"),
        (401, "The access token is missing or wrong"),
        (413, "The body is over the size limit"),
        (422, "A missing field, a wrong type, an unknown field or a value out of range"),
    ]
}


class FairLock:
    """A lock that its waiters take in the order they asked for it (threading.Lock
    promises no order, so a thread that keeps taking it could starve the others)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._held = False

    def __enter__(self) -> FairLock:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._held or self._queue[0] is not ticket:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


class ModelService:
    """The loaded model and the lock that lets one piece of work at a time use it."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self.lock = FairLock()

    def next_words(self, r: NextRequest) -> dict[str, Any]:
        with self.lock:
            words = self.lm.next_words(r.prompt, r.k)
        return {"words": [{"word": w, "p": p} for w, p in words]}

    def complete(self, r: CompleteRequest) -> dict[str, Any]:
        with self.lock:
            text = self.lm.complete(r.prompt, r.words, r.temperature, r.top_k, r.top_p, r.seed)
        out: dict[str, Any] = {"completion": text}
        if not text:
            out["note"] = "the model ended the sentence here: the first token it chose is <eos>"
        return out

    def score(self, r: ScoreRequest) -> dict[str, Any]:
        # Counted first (the tokenizer alone, no model), so that the work and the answer are bounded.
        counts = [
            len(ids) + 1
            for ids in (
                e.ids for e in self.lm.tokenizer.encode_batch([t.strip() for t in r.texts], add_special_tokens=False)
            )
        ]
        if sum(counts) > MAX_SCORE_TOKENS:
            raise PromptError(
                f"the texts have {sum(counts):,} tokens; the limit per request is "
                f"{MAX_SCORE_TOKENS:,}: send them in several requests"
            )
        results, start, size = [], 0, 0
        for end, n in enumerate(counts, 1):  # slices of about SLICE_TOKENS, the lock taken for each
            size += n
            if size >= SLICE_TOKENS or end == len(counts):
                with self.lock:
                    results += self.lm.score(r.texts[start:end], per_token=r.per_token)
                start, size = end, 0
        return {"results": results}

    def trace(self, r: TraceRequest) -> dict[str, Any]:
        from lstm_lm.inference.inspection import trace_summary

        n = len(self.lm.tokenizer.encode(r.prompt.strip(), add_special_tokens=False).ids)
        if n > MAX_TRACE_TOKENS:
            raise PromptError(f"the prompt has {n} tokens; /v1/trace reads at most {MAX_TRACE_TOKENS}")
        with self.lock:
            trace = self.lm.trace(r.prompt, top_k=r.top_k, swap=(r.swap.word, r.swap.other) if r.swap else None)
        return trace_summary(trace, r.units)


class _JSON(JSONResponse):
    """JSON answers that are always valid JSON: a number that is not finite becomes null."""

    def render(self, content: Any) -> bytes:
        return dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def create_app(lm: LanguageModel, on_ready: Callable[[], None] | None = None, token: str | None = None) -> FastAPI:
    """The ASGI app serving `lm`: the JSON API under /v1, the web page at /. `on_ready` is
    called once the server has started. With `token`, every request but /healthz needs it."""
    service = ModelService(lm)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(
        title="lstm-lm",
        version=__version__,
        lifespan=lifespan,
        default_response_class=_JSON,
        description="Next words, completions, scores and the gates of a trained LSTM language model.",
    )
    _add_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    if token:
        app.add_middleware(_TokenGate, token=token)  # added last, so it runs first
    # Plain (not async) functions: FastAPI runs them in its thread pool (see the module's docstring).
    for path, endpoint, summary in [
        ("/v1/next", service.next_words, "The likeliest next words"),
        ("/v1/complete", service.complete, "Continue the prompt"),
        ("/v1/score", service.score, "Log-probability and perplexity of each text"),
        ("/v1/trace", service.trace, "Gates, state norms and guesses after each token"),
    ]:
        app.post(path, summary=summary, responses=ERRORS)(endpoint)

    @app.get("/v1/model", summary="What the model is")
    def model() -> dict[str, Any]:
        return lm.describe(paths=False) | {
            "limits": {
                "body_bytes": MAX_BODY_BYTES,
                "prompt_chars": MAX_PROMPT_CHARS,
                "texts": MAX_TEXTS,
                "score_tokens": MAX_SCORE_TOKENS,
                "trace_tokens": MAX_TRACE_TOKENS,
            }
        }

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return _JSON({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = e.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "the body is not valid JSON")
        return _error(422, "; ".join(_describe(p) for p in problems))

    @app.exception_handler(LSTMLMError)
    async def unreadable(request: Request, e: LSTMLMError) -> JSONResponse:
        return _error(400, str(e))  # an empty prompt, one of unknown words only, too many tokens

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), e.headers)  # a 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        # A bug, not a bad request: say so without a traceback; the server keeps serving.
        return _error(500, f"internal error ({type(e).__name__}); please report it")


def _describe(problem: dict[str, Any]) -> str:
    """'k: Input should be less than or equal to 100', from one of pydantic's errors."""
    where = [str(p) for p in problem.get("loc", ()) if p != "body"]
    if problem.get("type") == "missing":
        return f"{'.'.join(where)}: required"
    if problem.get("type") == "extra_forbidden":
        return f"{'.'.join(where)}: unknown field"
    field = ".".join(where) or "body"
    return f"{field}: {problem.get('msg', 'invalid')}"


class _BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, whether or not it
    says its length. The body (at most `limit` bytes) is read here, then handed on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        chunks, size = [], 0
        while True:  # a chunked body is counted as it arrives
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = dumps({"error": f"the request body is over the limit of {self.limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TokenGate:
    """ASGI middleware: a request needs the access token, as `Authorization: Bearer TOKEN`,
    a `token` query parameter (which also sets a cookie, so that the page's own requests
    carry it) or that cookie; /healthz alone is open. Compared in constant time."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        from starlette.requests import Request as StarletteRequest

        request = StarletteRequest(scope)
        auth = request.headers.get("authorization", "")
        query = request.query_params.get("token")
        if self._matches(auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None) or self._matches(
            request.cookies.get(TOKEN_COOKIE)
        ):
            return await self.app(scope, receive, send)
        if self._matches(query):

            async def send_with_cookie(message):
                if message["type"] == "http.response.start":
                    cookie = f"{TOKEN_COOKIE}={query}; Path=/; HttpOnly; SameSite=Strict"
                    message = message | {"headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
                await send(message)

            return await self.app(scope, receive, send_with_cookie)
        await _error(
            401,
            "this server needs its access token: send 'Authorization: Bearer TOKEN', or open "
            "the page at /?token=TOKEN (lstm-lm serve printed it when it started)",
        )(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, token: str | None, no_token: bool) -> str | None:
    """The token the server needs: the one given; beyond loopback, a new random one
    unless `no_token` (then a warning); on loopback, none unless given."""
    from lstm_lm.utils import log

    if token is not None and no_token:
        raise LSTMLMError("--token and --no-token: choose one")
    if token is not None:
        if len(token) < 8 or not token.isascii() or not token.isprintable() or " " in token:
            raise LSTMLMError("--token: give at least 8 printable ASCII characters without spaces")
        return token
    if is_loopback(host):
        return None
    if no_token:
        log(
            f"warning: serving on {host} with no access token: anyone who can reach this machine can use "
            "the API and the page"
        )
        return None
    return secrets.token_urlsafe(24)


def listen(host: str, port: int):
    """A socket listening on host:port (an IPv6 address in brackets in the URL), and its URL."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise LSTMLMError(f"cannot listen on {host}:{port}: {why}") from None
    sock.listen(2048)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


def run_server(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    threads: int = 1,
    token: str | None = None,
    no_token: bool = False,
) -> None:
    """Load the model once, listen on host:port and serve until Ctrl-C or SIGTERM, then
    finish the requests in flight and return. `threads`: PyTorch's CPU threads. Beyond
    loopback, requests need an access token (`token`, or one made and printed here)."""
    import signal

    import torch
    import uvicorn

    from lstm_lm.utils import log

    token = access_token(host, token, no_token)
    torch.set_num_threads(threads)
    lm = LanguageModel.load(checkpoint, device)
    sock, url = listen(host, port)
    opening = f"{url}/?token={token}" if token else url
    needs = f"; the API needs the header Authorization: Bearer {token}" if token else ""

    def ready() -> None:
        log(
            f"serving {lm.checkpoint} ({lm.cell}, {lm.vocab_size:,} tokens) at {opening} "
            f"(web page at /, API docs at /docs){needs}; Ctrl-C stops"
        )

    server = uvicorn.Server(
        uvicorn.Config(create_app(lm, ready, token), log_level="warning", timeout_graceful_shutdown=10)
    )
    stopped: list[int] = []

    def on_signal(signum, frame):
        # uvicorn takes SIGINT and SIGTERM while it runs, shuts down gracefully, puts these
        # handlers back and raises the signal again: taken here, a stop is a clean exit.
        stopped.append(signum)
        if not server.should_exit:  # before uvicorn has taken over: stop at once
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    log(f"stopped ({signal.Signals(stopped[0]).name})" if stopped else "stopped")
