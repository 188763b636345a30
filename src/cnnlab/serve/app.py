"""`cnnlab serve`: the upload-and-classify page and a REST API over one bundle (FastAPI + uvicorn).

The model is loaded and warmed once per worker at start-up; `/readyz` says so. Every upload goes
through the training decoder in a worker thread, so a slow or hostile image never blocks the
event loop, and every way an upload can be wrong is a 4xx with a message: 413 over the body limit
(counted as the bytes arrive, so a chunked body cannot slip past it) or for a decompression bomb,
415 for bytes that are not an image, 422 for a damaged one.
"""

from __future__ import annotations

import hmac
import os
import time
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cnnlab.data.decode import DecodeError, ImageTooLarge, NotAnImage
from cnnlab.evaluate.predict import Predictor
from cnnlab.models.checkpoint import bundle_folder

MAX_BODY = 10 * 2**20
MAX_BATCH = 64
INLINE_BYTES, INLINE_SECONDS = 256 * 1024, 0.003  # below both, an upload is classified on the event loop
KNOWN_PATHS = {"/", "/livez", "/readyz", "/model", "/predict", "/predict/batch", "/metrics", "/docs", "/openapi.json"}


class BodyLimit:
    """ASGI middleware: 413 once a request body passes `limit` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            status = 400 if not length.isdigit() else 413
            detail = "bad Content-Length" if status == 400 else f"body over the {self.limit:,}-byte limit"
            return await JSONResponse({"detail": detail}, status)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"body over the {self.limit:,}-byte limit")
            return message

        await self.app(scope, counted, send)


class Metrics:
    """ASGI middleware: count every answer by path and status, and time it (plain ASGI: no extra task)."""

    def __init__(self, app, requests, latency):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # an exception that escapes is a 500

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.requests.labels(path, str(status)).inc()
            self.latency.labels(path).observe(time.perf_counter() - start)


def _status_for(error: DecodeError) -> int:
    """413 for a decompression bomb, 415 for bytes that are no image, 422 for a damaged image."""
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, NotAnImage):
        return 415
    return 422


def create_app(path: str | None = None, engine: str | None = None, threads: int | None = None,
               max_body: int | None = None, api_key: str | None = None) -> FastAPI:
    """The app for the bundle (or run folder) at `path`; unset arguments come from CNNLAB_SERVE_* variables."""
    # Over 60 lines on purpose: FastAPI's style, each route a short closure over this app's one model.
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    env = os.environ
    path = path or env["CNNLAB_SERVE_PATH"]
    engine = engine or env.get("CNNLAB_SERVE_ENGINE", "auto")
    threads = threads or int(env.get("CNNLAB_SERVE_THREADS", "1"))
    max_body = max_body or int(env.get("CNNLAB_SERVE_MAX_BODY", str(MAX_BODY)))
    api_key = api_key if api_key is not None else env.get("CNNLAB_SERVE_API_KEY", "")
    state: dict = {"predictor": None}
    registry = CollectorRegistry()
    requests = Counter("cnnlab_requests", "HTTP requests by path and status", ["path", "status"], registry=registry)
    latency = Histogram("cnnlab_request_seconds", "request latency", ["path"], registry=registry,
                        buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))

    async def lifespan(app):
        state["predictor"] = Predictor.load(bundle_folder(path), engine, threads)
        state["predictor"].warm()
        yield

    app = FastAPI(title="cnnlab", summary="Upload an image, get every class's probability.", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(Metrics, requests=requests, latency=latency)  # outermost: sees every answer

    def _predictor() -> Predictor:
        if state["predictor"] is None:
            raise HTTPException(503, "the model is still loading")
        return state["predictor"]

    def _authorised(request: Request) -> None:
        if api_key and not hmac.compare_digest(request.headers.get("x-api-key", ""), api_key):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    def _answer(predictor: Predictor, probs) -> dict:
        classes = predictor.classes_
        order = sorted(range(len(classes)), key=lambda k: -probs[k])
        top = order[0]
        return {"prediction": classes[top], "probability": round(float(probs[top]), 6),
                "uncertain": bool(probs[top] < predictor.info.get("uncertain_below", 0.0)),
                "probabilities": {classes[k]: float(probs[k]) for k in order}}

    async def _classify(predictor: Predictor, data: bytes) -> dict:
        if not data:
            raise HTTPException(415, "empty upload: send an image file")
        try:
            if len(data) <= INLINE_BYTES and predictor.seconds <= INLINE_SECONDS:
                probs = predictor.predict_bytes(data)  # a small image on a small model: a thread hop costs more
            else:  # decode and model in one worker-thread hop: the event loop never waits on a big image
                probs = await run_in_threadpool(predictor.predict_bytes, data)
        except DecodeError as e:
            raise HTTPException(_status_for(e), f"not a usable image: {e}") from None
        return _answer(predictor, probs)

    async def _form(request: Request, max_files: int):
        try:
            return await request.form(max_files=max_files, max_fields=16)
        except HTTPException:
            raise
        except ClientDisconnect:
            raise HTTPException(400, "the request body ended early") from None
        except Exception as e:  # malformed multipart: the client's mistake
            raise HTTPException(400, f"malformed multipart body: {str(e)[:120]}") from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("cnnlab.serve").joinpath("page.html").read_text()

    @app.get("/livez")
    async def livez():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if state["predictor"] is None:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ready", "engine": state["predictor"].kind}

    @app.get("/model")
    async def model_info():
        predictor = _predictor()
        keys = ("model_name", "metrics", "uncertain_below", "threshold_from", "cnnlab_version", "split_sha256", "run")
        return {"classes": predictor.classes_, **{k: predictor.info.get(k) for k in keys},
                "preprocessing": predictor.preprocessing, "engine": predictor.kind}

    @app.post("/predict")
    async def predict(request: Request):
        """One image: a multipart form with the file in field `file`, or the raw image bytes as the body."""
        _authorised(request)
        predictor = _predictor()
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await _form(request, 1)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "send the image in the multipart field 'file'")
            data = await upload.read()
        else:
            try:
                data = await request.body()
            except ClientDisconnect:
                raise HTTPException(400, "the request body ended early") from None
        return await _classify(predictor, data)

    @app.post("/predict/batch")
    async def predict_batch(request: Request):
        """Several images as multipart fields named `files`; one answer (or error) per image, in order."""
        _authorised(request)
        predictor = _predictor()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send a multipart form with the images in fields named 'files'")
        form = await _form(request, MAX_BATCH)
        uploads = [u for u in form.getlist("files") if not isinstance(u, str)]
        if not uploads:
            raise HTTPException(422, "no images: send them in multipart fields named 'files'")
        results, arrays, index = [], [], []
        for k, upload in enumerate(uploads):
            data = await upload.read()
            try:
                arrays.append(await run_in_threadpool(predictor.decode, data))
                index.append(k)
                results.append(None)
            except DecodeError as e:
                results.append({"filename": upload.filename, "error": f"not a usable image: {e}",
                                "status": _status_for(e)})
        if arrays:
            probs = await run_in_threadpool(predictor.predict_arrays, arrays)
            for k, p in zip(index, probs):
                results[k] = {"filename": uploads[k].filename, **_answer(predictor, p)}
        return {"results": results}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def check_port(host: str, port: int) -> None:
    """UserError unless `host:port` can be bound now, tried the way uvicorn binds it, so a taken port is
    one clear line before the URL is announced, not a uvicorn log line after it."""
    import errno
    import socket

    from cnnlab.core.errors import UserError

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; choose one from 1024 to 65535 (default 8000)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        sock.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another server is listening on it); "
                            f"stop that server, or choose a free port with --port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"cannot listen on {host}:{port}: permission denied (ports below 1024 need root); "
                            "choose a port from 1024 up with --port") from None
        why = getattr(e, "strerror", None) or str(e)
        raise UserError(f"cannot listen on {host}:{port}: {why}; --host must be an address of this machine "
                        "(default 127.0.0.1)") from None
    finally:
        sock.close()


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, threads: int = 1,
          engine: str = "auto", max_body: int = MAX_BODY, api_key: str = "", log=print) -> None:
    """Run uvicorn with `workers` processes, each loading the bundle once."""
    import uvicorn

    from cnnlab.core.errors import UserError
    from cnnlab.models.checkpoint import load_bundle

    folder, info = load_bundle(path)  # a bad bundle fails here, before any worker starts
    if not 1 <= workers <= 64:
        raise UserError("--workers must be between 1 and 64")
    check_port(host, port)  # before the URL is announced: a taken port is one clear error, not a log line
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model")
    os.environ.update({"CNNLAB_SERVE_PATH": str(folder), "CNNLAB_SERVE_ENGINE": engine,
                       "CNNLAB_SERVE_THREADS": str(threads), "CNNLAB_SERVE_MAX_BODY": str(max_body),
                       "CNNLAB_SERVE_API_KEY": api_key})
    log(f"serving {info['model_name']} ({len(info['classes'])} classes) from {folder} on http://{host}:{port}/ "
        f"with {workers} worker(s)")
    uvicorn.run("cnnlab.serve.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False, timeout_graceful_shutdown=5)
