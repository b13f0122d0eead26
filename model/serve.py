"""A small web app for a registered checkpoint (``jagpt serve``): a demo page and a JSON API.

Routes:

* ``GET /``: the demo page (``model/static/index.html``): a text area, the
  sampling parameters, a Generate button, and the text streaming in.
* ``GET /api/info``: the checkpoint, the model's shape, the limits, the defaults and the
  load (generations running and waiting).
* ``POST /api/generate``: JSON in (``prompt``, ``max_new_tokens``,
  ``min_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
  ``num_samples``), JSON out (``samples``, ``text`` = the first sample, ``seed``,
  ``checkpoint``, ``seconds``).
* ``POST /api/generate/stream``: the same request; the answer is
  ``application/x-ndjson``, one JSON object per line: ``{"sample": i, "text": piece}``
  as each piece of text becomes whole, then ``{"done": true, ...}`` with what
  ``/api/generate`` returns (or ``{"error": ...}`` if generation failed).
* ``GET /healthz``.

Limits (:class:`Limits`): the prompt's characters and tokens, new tokens,
samples per request, and generations at once (``max_concurrent``). A request
that finds every slot busy waits in a queue of at most ``max_queue`` requests,
for at most ``queue_timeout`` seconds; a request beyond the queue, or one that
waited too long, gets 429 with ``Retry-After``. Nothing hangs: a stream whose
client went away stops generating after the current token and frees its slot.

Bad input is a 4xx with a message saying what is wrong: 422 for a body that is
not JSON, a field of the wrong type or out of range (``{"error": "top_p:
Input should be less than or equal to 1", ...}``), 413 for a prompt over the
limits. The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from importlib import resources

from pydantic import BaseModel, ConfigDict, Field

from encoder.bpe import Encoder
from model.decode import Decoder, Sampling
from model.generate import generate_samples
from model.gpt import GPT


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4000
    max_prompt_tokens: int | None = None  # default: the model's context minus one
    max_new_tokens: int = 256
    max_samples: int = 4
    max_concurrent: int = 1
    max_queue: int = 8
    queue_timeout: float = 30.0

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_new_tokens", "max_samples", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0 or self.queue_timeout <= 0:
            raise ValueError("max_queue must be >= 0 and queue_timeout > 0")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    max_new_tokens: int = Field(default=80, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=0.9, ge=0, le=10)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    num_samples: int = Field(default=1, ge=1)


class Busy(Exception):
    pass


class Gate:
    """At most ``limits.max_concurrent`` generations at once, ``limits.max_queue`` waiting."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.slots = asyncio.Semaphore(limits.max_concurrent)
        self.waiting = 0
        self.running = 0

    async def enter(self) -> None:
        if self.slots.locked() and self.waiting >= self.limits.max_queue:
            raise Busy(f"the server is busy: {self.limits.max_concurrent} generation(s) running and "
                       f"{self.waiting} waiting; try again shortly")
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.limits.queue_timeout)
        except TimeoutError:
            raise Busy(f"the server is busy: no free slot within {self.limits.queue_timeout:g} s; try again shortly") from None
        finally:
            self.waiting -= 1
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        self.slots.release()


def _page() -> str:
    return (resources.files("model") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(model: GPT, encoder: Encoder, checkpoint: str, limits: Limits = Limits(), defaults: dict | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    decoder = Decoder(model)
    ctx = model.cfg.seq_len
    max_prompt_tokens = min(limits.max_prompt_tokens or ctx - 1, ctx - 1)
    defaults = {**GenerateRequest().model_dump(exclude={"seed"}), **(defaults or {})}
    app = FastAPI(title="jagpt", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    state: dict = {}

    def gate() -> Gate:  # made on first use, in the server's event loop
        if "gate" not in state:
            state["gate"] = Gate(limits)
        return state["gate"]

    class BadRequest(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
                continue
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(problems) or "invalid request", "detail": jsonable(exc.errors())}, 422)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return JSONResponse({"error": str(exc)}, 429, headers={"Retry-After": "2"})

    def check(req: GenerateRequest) -> tuple[Sampling, int]:
        if len(req.prompt) > limits.max_prompt_chars:
            raise BadRequest(413, f"the prompt has {len(req.prompt)} characters; this server takes at most "
                                  f"{limits.max_prompt_chars}")
        n = len(encoder.encode(req.prompt))
        if n > max_prompt_tokens:
            raise BadRequest(413, f"the prompt has {n} tokens; this server takes at most {max_prompt_tokens}")
        if req.max_new_tokens > limits.max_new_tokens:
            raise BadRequest(422, f"max_new_tokens: {req.max_new_tokens} is over this server's limit of {limits.max_new_tokens}")
        if req.min_new_tokens > req.max_new_tokens:
            raise BadRequest(422, f"min_new_tokens: {req.min_new_tokens} is more than max_new_tokens {req.max_new_tokens}")
        if req.num_samples > limits.max_samples:
            raise BadRequest(422, f"num_samples: {req.num_samples} is over this server's limit of {limits.max_samples}")
        sampling = Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_new_tokens=req.min_new_tokens)
        return sampling, req.seed if req.seed is not None else secrets.randbelow(2**31)

    def run(req: GenerateRequest, sampling: Sampling, seed: int, on_text=None, stop: threading.Event | None = None) -> dict:
        start = time.monotonic()
        samples = generate_samples(decoder, encoder, req.prompt, req.max_new_tokens, sampling, seed,
                                   tuple(range(req.num_samples)), on_text, stop.is_set if stop else None)
        return {"checkpoint": checkpoint, "prompt": req.prompt, "samples": samples, "text": samples[0], "seed": seed,
                "seconds": round(time.monotonic() - start, 3)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.get("/healthz")
    async def health():
        return {"ok": True}

    @app.get("/api/info")
    async def info():
        return {"checkpoint": checkpoint, "model": model.cfg.model_dump(),
                "limits": {**asdict(limits), "max_prompt_tokens": max_prompt_tokens}, "defaults": defaults,
                "load": {"running": gate().running, "waiting": gate().waiting}}

    @app.post("/api/generate")
    async def generate(req: GenerateRequest):
        sampling, seed = check(req)
        await gate().enter()
        try:
            return await asyncio.to_thread(run, req, sampling, seed)
        finally:
            gate().leave()

    @app.post("/api/generate/stream")
    async def stream(req: GenerateRequest):
        sampling, seed = check(req)
        await gate().enter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def work():
            try:
                result = run(req, sampling, seed,
                             lambda i, piece: loop.call_soon_threadsafe(queue.put_nowait, {"sample": i, "text": piece}), stop)
                message = {"done": True, **result}
            except Exception as e:  # noqa: BLE001 - reported to the client, which is waiting for the end
                message = {"error": f"generation failed: {type(e).__name__}: {e}"}
            loop.call_soon_threadsafe(queue.put_nowait, message)
            loop.call_soon_threadsafe(gate().leave)  # the slot is free once the work is, not before

        threading.Thread(target=work, name="jagpt-generate", daemon=True).start()

        async def lines() -> AsyncIterator[bytes]:
            try:
                while True:
                    message = await queue.get()
                    yield (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")
                    if "done" in message or "error" in message:
                        return
            finally:
                stop.set()  # the client went away (or the stream ended): stop after the current token

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})

    return app


def jsonable(errors: list[dict]) -> list[dict]:
    """Pydantic's error list without the parts JSON cannot hold (exception objects in ``ctx``)."""
    return json.loads(json.dumps(errors, default=str))


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
