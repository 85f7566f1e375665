"""``tuwen serve``: a FastAPI app over one text→image model (+ optional captioner and CLIP).

Endpoints (JSON in, JSON out; errors are ``{"error": {"message": one line, "type", "code"}}`` with a 4xx status):

* ``POST /v1/images/generations`` — the OpenAI Images API shape (``prompt``, ``n``, ``response_format:
  "b64_json"``, ``size``) plus tuwen's ``seed``, ``top_k``, ``top_p``, ``temperature``, ``guidance_scale``,
  ``rerank``, ``keep`` and ``stream`` (server-sent events with partial images as codes are sampled).
* ``POST /predict`` — EasyNLP's shape: a row ``{"text", "max_generated_num", "idx"?}`` or a list of rows →
  the same rows with ``gen_imgbase64``.
* ``POST /v1/captions`` (``--captioner``), ``POST /v1/rerank`` (``--clip`` or ``--captioner``).
* ``GET /health`` (200 once the warm-up image is done, 503 before), ``GET /metrics`` (Prometheus), ``GET /``.

Generation goes through :class:`~tuwen.serve.batcher.Batcher` (continuous batching); image ``k`` of a request
with seed ``s`` is sampled with ``image_seed(s, key, k)`` — ``key`` 0 for ``/v1/images/generations`` and the
row's ``idx`` (or index) for ``/predict`` — so it equals ``tuwen generate PROMPT --seed s`` image ``k``
(and ``--mode=predict`` with ``seed=s``).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
import socket
import threading
import time
import traceback
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import ImageDecodeError, open_image
from ..errors import TuwenError
from .metrics import Metrics

from .requests import (CAPTION_FIELDS, GEN_FIELDS, PREDICT_FIELDS, SEED_MAX, ApiError, _bool,
                       _error_body, _float, _int, _type_name, _unknown)
from .server import ServeOptions, Server, _collect, _GenJob

__all__ = ["ServeOptions", "Server", "create_app", "serve_in_thread"]

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
# ================================================================================================ app

ENDPOINTS = ("/", "/health", "/metrics", "/predict", "/v1/images/generations", "/v1/captions", "/v1/rerank")


class _CountRequests:
    """Pure ASGI middleware: counts responses by endpoint and status, and their latency (to the last byte)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        path = path if path in ENDPOINTS else "/static" if path.startswith("/static/") else "other"
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(path, status[0], time.perf_counter() - t0)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of ``server`` (started/stopped with the app's lifespan)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="tuwen serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    opts = server.opts

    def error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
        return JSONResponse(_error_body(status, message, kind), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error(e.status, e.message, e.kind, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error(e.status_code, msg, "invalid_request_error", getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        traceback.print_exc()
        return error(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     "server_error")

    app.add_middleware(_CountRequests, metrics=server.metrics)

    def auth(request: Request) -> None:
        if opts.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > opts.max_body_bytes:
            raise ApiError(413, f"request body of {int(cl):,} bytes is above the limit of {opts.max_body_bytes:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > opts.max_body_bytes:
                raise ApiError(413, f"request body is above the limit of {opts.max_body_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request: Request, allow_list: bool = False):
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "text/json", ""):
            raise ApiError(415, f"send JSON (Content-Type: application/json), not {ctype}")
        raw = await read_body(request)
        if not raw.strip():
            raise ApiError(400, "empty request body; send a JSON object")
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not UTF-8 JSON") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if isinstance(body, list) and allow_list:
            return body
        if not isinstance(body, dict):
            raise ApiError(400, f"request body must be a JSON object{' or a list of objects' if allow_list else ''}, "
                                f"got {_type_name(body)}")
        return body

    def seed_of(body: dict, where: str = "") -> int:
        s = _int(body, "seed", lo=0, hi=SEED_MAX, where=where)
        return secrets.randbelow(2 ** 31) if s is None else s

    # ------------------------------------------------------------------ page, health, metrics
    @app.get("/")
    async def index():
        return Response((STATIC / "index.html").read_bytes(), media_type=STATIC_FILES["index.html"])

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            raise ApiError(404, f"no such file: /static/{name}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        if server.warmup_error:
            return JSONResponse({"status": "failed", "error": server.warmup_error, **server.info()}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"status": "warming_up", **server.info()}, status_code=503,
                                headers={"Retry-After": "2"})
        return {"status": "ready", "queue": server.batcher.waiting, "running": server.batcher.running,
                "uptime_s": round(time.time() - server.started, 1), **server.info()}

    @app.get("/metrics")
    async def metrics(request: Request):
        auth(request)
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ text→image
    async def rerank_images(prompt: str, images: list, keep: int):
        from ..rerank import rerank
        return await server.run_aux(rerank, server.scorer, prompt, images, keep)

    def parse_generation(body: dict) -> dict:
        _unknown(body, GEN_FIELDS)
        if "prompt" not in body:
            raise ApiError(400, "prompt is required")
        prompt = server.check_prompt(body["prompt"])
        n = _int(body, "n", 1, lo=1, hi=opts.max_n)
        fmt = body.get("response_format") or "b64_json"
        if fmt != "b64_json":
            raise ApiError(400, f"response_format {fmt!r} is not supported; this server returns images inline: "
                                f"use \"b64_json\"")
        size = body.get("size")
        s = server.model.config.image_size
        if size is not None and size != f"{s}x{s}":
            raise ApiError(400, f"size {size!r} is not available; this model makes {s}x{s} images")
        model = body.get("model")
        if model is not None and model not in ("tuwen", server.model_name):
            raise ApiError(400, f"model {model!r} is not served here; this server serves {server.model_name!r}")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise ApiError(400, f"user must be a string, got {_type_name(user)}")
        rr = _bool(body, "rerank")
        keep = _int(body, "keep", None, lo=1, hi=n)
        if keep is not None and not rr:
            raise ApiError(400, "keep needs \"rerank\": true")
        if rr and server.scorer is None:
            raise ApiError(400, "rerank needs a scorer: start the server with --clip DIR or --captioner DIR")
        return {"prompt": prompt, "n": n, "seed": seed_of(body), "sampling": server.sampling_key(body),
                "rerank": rr, "keep": keep or n, "stream": _bool(body, "stream")}

    async def finish(g: dict, images: list, b64: list) -> dict:
        data = [{"index": k, "b64_json": b64[k]} for k in range(g["n"])]
        out = {"created": int(time.time()), "model": server.model_name, "seed": g["seed"]}
        warnings = server.model.prompt_warnings(g["prompt"])
        if warnings:
            out["warnings"] = warnings
        if g["rerank"]:
            order, scores = await rerank_images(g["prompt"], images, g["keep"])
            data = [{**data[k], "score": scores[k]} for k in order]
            out["scorer"] = server.scorer.name
        out["data"] = data
        return out

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        auth(request)
        g = parse_generation(await read_json(request))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.timeout
        job = server.submit(loop, g["prompt"], g["seed"], 0, g["n"], g["sampling"], g["stream"])
        if g["stream"]:
            return StreamingResponse(stream_events(server, job, g, deadline, finish), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        images, b64 = [None] * g["n"], [None] * g["n"]
        try:
            async for ev in _collect(server, job, request, deadline, partial=False):
                if ev is not None:
                    images[ev["index"]], b64[ev["index"]] = ev["image"], ev["b64"]
        except BaseException:
            server.cancel(job)
            raise
        return await finish(g, images, b64)

    @app.post("/predict")
    async def predict(request: Request):
        auth(request)
        body = await read_json(request, allow_list=True)
        single = isinstance(body, dict)
        rows = [body] if single else body
        if not rows:
            raise ApiError(400, "no rows: send {\"text\": ...} or a list of such rows")
        if len(rows) > opts.max_rows:
            raise ApiError(400, f"{len(rows)} rows in one request; the limit is {opts.max_rows}")
        parsed = []
        for i, r in enumerate(rows):
            where = "" if single else f"row {i}: "
            if not isinstance(r, dict):
                raise ApiError(400, f"row {i} must be an object like {{\"text\": ...}}, got {_type_name(r)}")
            _unknown(r, PREDICT_FIELDS, where)
            if "text" not in r:
                raise ApiError(400, f"{where}text is required")
            idx = r.get("idx", i)
            if not isinstance(idx, (str, int)) or isinstance(idx, bool):
                raise ApiError(400, f"{where}idx must be a string or an integer, got {_type_name(idx)}")
            parsed.append({"text": server.check_prompt(r["text"], f"{where}text"), "idx": idx,
                           "n": _int(r, "max_generated_num", 1, lo=1, hi=opts.max_n, where=where),
                           "seed": seed_of(r, where), "sampling": server.sampling_key(r, where)})
        total = sum(p["n"] for p in parsed)
        if total > opts.max_queue:
            raise ApiError(400, f"{total} images in one request; the limit is --max_queue {opts.max_queue}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.timeout
        jobs = []
        try:
            for p in parsed:
                jobs.append(server.submit(loop, p["text"], p["seed"], p["idx"], p["n"], p["sampling"], stream=False))
            out = []
            for p, job in zip(parsed, jobs):
                b64 = [None] * p["n"]
                async for ev in _collect(server, job, request, deadline, partial=False):
                    if ev is not None:
                        b64[ev["index"]] = ev["b64"]
                row = {"idx": p["idx"], "text": p["text"], "gen_imgbase64": b64, "seed": p["seed"]}
                warnings = server.model.prompt_warnings(p["text"])
                if warnings:
                    row["warnings"] = warnings
                out.append(row)
        except BaseException:
            for job in jobs:
                server.cancel(job)
            raise
        return out[0] if single else out

    # ------------------------------------------------------------------ captions and rerank
    def decode_image(x, where: str):
        if isinstance(x, (bytes, bytearray)):
            data = bytes(x)
        elif isinstance(x, str):
            s = x.strip()
            if s.startswith("data:") and "," in s[:100]:
                s = s.split(",", 1)[1]
            if len(s) * 3 // 4 > opts.max_image_bytes:
                raise ApiError(413, f"{where} is larger than the limit of {opts.max_image_bytes:,} bytes")
            try:
                data = base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_" if ("-" in s or "_" in s) else None,
                                        validate=True)
            except ValueError:
                raise ApiError(400, f"{where} is not valid base64") from None
        else:
            raise ApiError(400, f"{where} must be a base64 string, got {_type_name(x)}")
        if len(data) > opts.max_image_bytes:
            raise ApiError(413, f"{where} is {len(data):,} bytes; the limit is {opts.max_image_bytes:,}")
        try:
            return open_image(data)
        except ImageDecodeError as e:
            status = 413 if "too large" in str(e) else 400
            raise ApiError(status, f"{where}: {e}") from None

    async def read_images(request: Request, fields: tuple[str, ...]) -> tuple[dict, list]:
        """JSON body or multipart form → (other fields, [image or [frames]])."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        video = fields[0] == "videos"
        if ctype == "multipart/form-data":
            cl = request.headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > opts.max_body_bytes:
                raise ApiError(413, f"request body of {int(cl):,} bytes is above the limit of {opts.max_body_bytes:,}")
            try:
                form = await request.form(max_files=opts.max_images, max_fields=50,
                                          max_part_size=opts.max_image_bytes)
            except Exception as e:  # noqa: BLE001 - python-multipart / starlette parse errors
                raise ApiError(400, f"bad multipart upload: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                    from None
            body, files = {}, []
            for name, v in form.multi_items():
                if hasattr(v, "read"):
                    data = await v.read()
                    files.append((v.filename or name, data))
                else:
                    try:
                        body[name] = json.loads(v)
                    except json.JSONDecodeError:
                        body[name] = v
            if not files:
                raise ApiError(400, "no file in the upload: attach images as form files (e.g. -F image=@a.png)")
            imgs = [decode_image(data, f"file {fn!r}") for fn, data in files]
            return body, ([imgs] if video else imgs)
        body = await read_json(request)
        many, one = fields
        if (many in body) == (one in body):
            raise ApiError(400, f"give exactly one of {one!r} (one base64 image) or {many!r} (a list of them)")
        items = body.pop(many) if many in body else [body.pop(one)]
        if not isinstance(items, list) or not items:
            raise ApiError(400, f"{many} must be a non-empty list of base64 images")
        if len(items) > opts.max_images:
            raise ApiError(400, f"{len(items)} images in one request; the limit is {opts.max_images}")
        if video:
            out = []
            for i, clip in enumerate(items):
                if not isinstance(clip, list) or not clip:
                    raise ApiError(400, f"video {i} must be a non-empty list of base64 frames")
                out.append([decode_image(f, f"video {i} frame {j}") for j, f in enumerate(clip)])
            return body, out
        return body, [decode_image(x, f"image {i}") for i, x in enumerate(items)]

    @app.post("/v1/captions")
    async def captions(request: Request):
        auth(request)
        if server.captioner is None:
            raise ApiError(404, "captioning is not enabled: start the server with --captioner DIR")
        fields = ("videos", "video") if server.captioner.config.video else ("images", "image")
        body, items = await read_images(request, fields)
        _unknown(body, CAPTION_FIELDS)
        n = _int(body, "max_generated_num", 1, lo=1, hi=opts.max_n)
        kw = {}
        beams = _int(body, "num_beams", None, lo=1, hi=16)
        if beams is not None:
            kw["num_beams"] = beams
        top_k = _int(body, "top_k", None, lo=1)
        if top_k is not None:
            kw["top_k"] = top_k
        for name in ("top_p", "temperature"):
            v = _float(body, name)
            if v is not None:
                kw[name] = v
        seed = _int(body, "seed", 0, lo=0, hi=SEED_MAX)
        try:
            server.captioner.config.sampling.replace(**kw)
        except TuwenError as e:
            raise ApiError(400, str(e)) from None

        def run():
            with torch.inference_mode():
                return server.captioner.generate(items, num_return_sequences=n, seed=seed, **kw)
        try:
            caps = await server.run_aux(run)
        except TuwenError as e:
            raise ApiError(400, str(e)) from None
        return {"model": Path(opts.captioner).name, "data": [{"index": i, "gen_text": g} for i, g in enumerate(caps)]}

    @app.post("/v1/rerank")
    async def rerank_endpoint(request: Request):
        auth(request)
        if server.scorer is None:
            raise ApiError(404, "reranking is not enabled: start the server with --clip DIR or --captioner DIR")
        body, images = await read_images(request, ("images", "image"))
        _unknown(body, ("text",))
        text = body.get("text")
        if text is None:
            raise ApiError(400, "text is required (the prompt to score the images against)")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "text must be a non-empty string")
        if len(text) > opts.max_prompt_chars:
            raise ApiError(400, f"text has {len(text)} characters; the limit is {opts.max_prompt_chars}")
        from ..rerank import order_by_score

        def run():
            with torch.inference_mode():
                return [float(s) for s in server.scorer.score([text] * len(images), images)]
        scores = await server.run_aux(run)
        return {"scorer": server.scorer.name, "scores": scores, "order": order_by_score(scores)}

    return app


async def stream_events(server: Server, job: _GenJob, g: dict, deadline: float, finish):
    """Server-sent events of one generation: queued, partial (as codes are sampled), image, done | error."""
    def sse(event: str, data: dict) -> str:
        return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    n = g["n"]
    images, b64 = [None] * n, [None] * n
    complete = False
    try:
        yield sse("queued", {"n": n, "seed": g["seed"], "waiting": server.batcher.waiting,
                             "grid": list(server.model.grid), "warnings": server.model.prompt_warnings(g["prompt"])})
        try:
            async for ev in _collect(server, job, None, deadline, partial=True):
                if ev is None:
                    yield ": keep-alive\n\n"
                elif ev["type"] == "partial":
                    yield sse("partial", {"index": ev["index"], "codes_done": ev["codes_done"],
                                          "codes_total": server.model.config.img_len, "b64_json": ev["b64"]})
                else:
                    images[ev["index"]], b64[ev["index"]] = ev["image"], ev["b64"]
                    yield sse("image", {"index": ev["index"], "b64_json": ev["b64"]})
            out = await finish(g, images, b64)
            complete = True
            yield sse("done", out)
        except ApiError as e:
            yield sse("error", _error_body(e.status, e.message, e.kind))
    finally:
        if not complete:
            server.cancel(job)


# ================================================================================================ running

def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run ``app`` under uvicorn in a background thread (tests, benchmarks) → (base URL, stop function)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
    srv = uvicorn.Server(config)
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="tuwen-uvicorn", daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if not th.is_alive() or time.time() - t0 > 60:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop():
        srv.should_exit = True
        th.join(15)
        sock.close()
    return f"http://{host}:{port}", stop


def png_bytes(b64: str) -> bytes:
    """Helper for clients and tests: the PNG bytes of a ``b64_json`` field."""
    return base64.b64decode(b64)

