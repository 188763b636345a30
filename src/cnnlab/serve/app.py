"""`cnnlab serve`: the upload-and-classify page and a REST API over one bundle (FastAPI + uvicorn).

The model is loaded and warmed once per worker at start-up; `/readyz` says so. Every upload goes
through the training decoder: a small upload for a fast model on the event loop, then into one
model call with the requests read beside it (serve/batching.py); any other in a worker thread, so
a slow or hostile image never blocks the event loop. Every way an upload can be wrong is a 4xx
with a message: 413 over the body limit
(counted as the bytes arrive, so a chunked body cannot slip past it) or for a decompression bomb,
415 for bytes that are not an image, 422 for a damaged one. `/openapi.json` documents every answer
(the models in serve/schemas.py) and every status; the request bodies, read by hand for speed, are
described to it in `openapi_extra`. `/explain` draws a class-activation map over the image: its
forward and backward pass run in a worker thread, one at a time, on PyTorch weights loaded at the
first `/explain`, so neither start-up nor `/predict` ever waits on it.
"""

from __future__ import annotations

import hmac
import os
from importlib import resources
from urllib.parse import quote

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cnnlab.core.errors import UserError
from cnnlab.data.decode import DecodeError, ImageTooLarge, NotAnImage
from cnnlab.evaluate.explain import DEFAULT_METHOD, METHODS, check_method, overlay, png_bytes
from cnnlab.evaluate.predict import Predictor
from cnnlab.models.checkpoint import bundle_folder
from cnnlab.serve.batching import Batcher
from cnnlab.serve.middleware import BodyLimit, Metrics
from cnnlab.serve.schemas import Alive, BatchAnswer, ErrorBody, Loading, ModelInfo, Prediction, Ready

MAX_BODY = 10 * 2**20
# uvicorn's settings for `cnnlab serve` (benchmarks/serve_load.py runs its bare HTTP ceiling app with the same):
# "auto" takes uvloop and httptools, both installed with cnnlab
UVICORN = {"loop": "auto", "http": "auto", "log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 5}
MAX_BATCH = 64
INLINE_BYTES, INLINE_SECONDS = 256 * 1024, 0.003  # below both, an upload is classified on the event loop

# For /openapi.json: why each route answers each error status (every error body is {"detail": str}), and the
# request bodies.
BAD_BODY = "bad Content-Length, a malformed multipart body (or too many files or fields in it), or a body that ended early"
LOADING = "the model is still loading"
PREDICT_ERRORS = {400: BAD_BODY, 413: "body over the size limit, or an image over the pixel limit (decompression bomb)",
                  415: "not an image, or an empty upload", 422: "a damaged image, or no file in multipart field `file`",
                  503: LOADING}
BATCH_ERRORS = {400: BAD_BODY, 413: "body over the size limit", 415: "not a multipart form",
                422: "no files in multipart fields `files`", 503: LOADING}
# Non-empty: an empty body is refused (415); bytes that are no image are still answered 415 or 422.
IMAGE = {"type": "string", "format": "binary", "minLength": 1}
# A form's other text fields are ignored, up to _form's 16 (more is a 400); a file in any other field is a 400.
OTHER_FIELDS = {"additionalProperties": {"type": "string"}, "maxProperties": 17}
PREDICT_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": IMAGE}, "required": ["file"],
                                       **OTHER_FIELDS},
                            "encoding": {"file": {"contentType": "image/*"}}},
    "image/*": {"schema": IMAGE},  # a raw body: the image bytes (the Content-Type is not needed to decode them)
    "application/octet-stream": {"schema": IMAGE}}}
BATCH_BODY = {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["files"], **OTHER_FIELDS, "properties": {
        # any bytes per file, even none: a file that is no image gets its own error item in the 200 answer
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                  "maxItems": MAX_BATCH}}},
    "encoding": {"files": {"contentType": "image/*"}}}}}
API_KEY_SCHEME = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
TEXT = {"type": "string", "minLength": 1}
EXPLAIN_ERRORS = {**PREDICT_ERRORS, 422: "a damaged image, no file in multipart field `file`, a `class` that is not "
                  "one of the model's, or an unknown `method` (the detail names the valid ones)"}
EXPLAIN_PARAMS = [  # read by hand, as the bodies are: FastAPI's own 422 body is not the app's {"detail": str}
    {"name": "class", "in": "query", "required": False, "schema": TEXT,
     "description": "the class to map: a name of GET /model's `classes`, or its index; default: the predicted class"},
    {"name": "method", "in": "query", "required": False,
     "schema": {"type": "string", "enum": list(METHODS), "default": DEFAULT_METHOD},
     "description": "the class-activation method (torchcam's); a `+` is sent percent-encoded, `%2B`"}]
EXPLAIN_HEADERS = {  # name: (what it says, its value's schema)
    "X-Explained-Class": ("the class mapped, percent-encoded UTF-8", TEXT),
    "X-Class-Index": ("its index in GET /model's `classes`", {"type": "string", "pattern": "^[0-9]+$"}),
    "X-Class-Probability": ("its calibrated probability (as /predict's), to 6 decimals",
                            {"type": "string", "pattern": "^[01][.][0-9]{6}$"}),
    "X-Method": ("the method used", {"type": "string", "enum": list(METHODS)}),
    "X-Layer": ("the layer whose activations are mapped (a name of the model's modules)", TEXT)}
EXPLAIN_PNG = {"description": "the image as the model saw it (the same preprocessing as /predict), enlarged to at "
               "least 192 px a side, with the class's map over it in the jet colours",
               "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
               "headers": {name: {"description": why, "required": True, "schema": schema}
                           for name, (why, schema) in EXPLAIN_HEADERS.items()}}


def _status_for(error: DecodeError) -> int:
    """413 for a decompression bomb, 415 for bytes that are no image, 422 for a damaged image."""
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, NotAnImage):
        return 415
    return 422


def _unusable(error: DecodeError) -> HTTPException:
    return HTTPException(_status_for(error), f"not a usable image: {error}")


def _render(predictor: Predictor, data: bytes, target: int | None, method: str):
    """(PNG bytes, Explanation, probabilities): the map of class `target` over the image. A worker thread's
    work: a forward and a backward pass in PyTorch, the first call also loading the fp32 weights."""
    explanation, probs = predictor.explain(data, target, method)
    return png_bytes(overlay(explanation.image, explanation.cam)), explanation, probs


def _errors(why: dict[int, str]) -> dict:
    """`responses=` for these error statuses, each with the error body."""
    return {status: {"model": ErrorBody, "description": why[status]} for status in sorted(why)}


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
    state: dict = {"predictor": None, "explaining": None, "batcher": None}
    registry = CollectorRegistry()
    requests = Counter("cnnlab_requests", "HTTP requests by path and status", ["path", "status"], registry=registry)
    latency = Histogram("cnnlab_request_seconds", "request latency", ["path"], registry=registry,
                        buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
    batch_sizes = Histogram("cnnlab_batch_images", "images per model call of requests classified together",
                            registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64))

    async def lifespan(app):
        state["explaining"] = anyio.Lock()  # one map at a time per worker: each is a forward and backward pass
        state["predictor"] = Predictor.load(bundle_folder(path), engine, threads)
        state["predictor"].warm()  # the PyTorch model /explain maps on is not loaded here: on the first /explain
        state["batcher"] = Batcher(state["predictor"].predict_arrays, MAX_BATCH, state["predictor"].seconds,
                                   observe=batch_sizes.observe)
        yield

    app = FastAPI(title="cnnlab", summary="Upload an image, get every class's probability.", lifespan=lifespan)
    # 401 and the X-API-Key scheme are documented only where they apply: when this app has a key
    guarded = {"security": [{"apiKey": []}]} if api_key else {}
    unauthorised = {401: "missing or wrong X-API-Key header"} if api_key else {}

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)  # caches it in app.openapi_schema
            if api_key:
                doc.setdefault("components", {})["securitySchemes"] = {"apiKey": API_KEY_SCHEME}
        return app.openapi_schema

    app.openapi = openapi
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
                "probabilities": {classes[k]: float(probs[k]) for k in order}, "model": predictor.meta["model_name"]}

    async def _classify(predictor: Predictor, data: bytes) -> dict:
        try:
            if len(data) <= INLINE_BYTES and predictor.seconds <= INLINE_SECONDS:
                # a small image on a small model: a thread hop costs more; requests read together, one call
                probs = await state["batcher"].classify(predictor.decode(data))
            else:  # decode and model in one worker-thread hop: the event loop never waits on a big image
                probs = await run_in_threadpool(predictor.predict_bytes, data)
        except DecodeError as e:
            raise _unusable(e) from None
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

    async def _image(request: Request) -> bytes:
        """The one image of a /predict or /explain request: multipart field `file`, or the raw body."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await _form(request, 1)
            try:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise HTTPException(422, "send the image in the multipart field 'file'")
                data = await upload.read()
            finally:  # its spooled file, or it lingers until the collector finds it
                await form.close()
        else:
            try:
                data = await request.body()
            except ClientDisconnect:
                raise HTTPException(400, "the request body ended early") from None
        if not data:
            raise HTTPException(415, "empty upload: send an image file")
        return data

    def _explain_query(predictor: Predictor, request: Request) -> tuple[int | None, str]:
        """The class index (None: the predicted one) and method of an /explain request; 422 naming the choices."""
        name, method = request.query_params.get("class"), request.query_params.get("method", DEFAULT_METHOD)
        try:
            return (None if name is None else predictor.class_index(name)), check_method(method)
        except UserError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("cnnlab.serve").joinpath("page.html").read_text()

    @app.get("/livez", response_model=Alive)
    async def livez():
        return {"status": "alive"}

    @app.get("/readyz", response_model=Ready,
             responses={503: {"model": Loading, "description": LOADING}})
    async def readyz():
        if state["predictor"] is None:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ready", "engine": state["predictor"].kind}

    # documented, not validated per request: its open parts (metrics, engines) are bundle.json's, and a key a
    # newer exporter writes there should reach clients rather than turn /model into a 500 (the fuzzer flags it)
    @app.get("/model", responses={200: {"model": ModelInfo, "description": "the model and its bundle's record"},
                                  **_errors({503: LOADING})})
    async def model_info():
        predictor = _predictor()
        keys = ("model_name", "metrics", "uncertain_below", "threshold_from", "cnnlab_version", "split_sha256", "run",
                "engines")
        return {"classes": predictor.classes_, **{k: predictor.info.get(k) for k in keys},
                "preprocessing": predictor.preprocessing, "temperature": predictor.temperature, "engine": predictor.kind}

    # response_model: validated, then serialised by pydantic's core straight to JSON bytes, which is faster
    # than FastAPI's jsonable_encoder that a plain dict goes through
    @app.post("/predict", response_model=Prediction, responses=_errors({**PREDICT_ERRORS, **unauthorised}),
              openapi_extra={"requestBody": PREDICT_BODY, **guarded})
    async def predict(request: Request):
        """One image: a multipart form with the file in field `file`, or the raw image bytes as the body."""
        _authorised(request)
        predictor = _predictor()
        return await _classify(predictor, await _image(request))

    @app.post("/explain", response_class=Response,
              responses={200: EXPLAIN_PNG, **_errors({**EXPLAIN_ERRORS, **unauthorised})},
              openapi_extra={"requestBody": PREDICT_BODY, "parameters": EXPLAIN_PARAMS, **guarded})
    async def explain(request: Request):
        """One image's class-activation map over it, as a PNG: the bodies /predict takes; `class` and `method`
        in the query. Computed in a worker thread, one at a time, so /predict never waits on it."""
        _authorised(request)
        predictor = _predictor()
        target, method = _explain_query(predictor, request)
        data = await _image(request)
        async with state["explaining"]:  # waiting here, on the event loop, holds no worker thread
            try:
                png, explanation, probs = await run_in_threadpool(_render, predictor, data, target, method)
            except DecodeError as e:
                raise _unusable(e) from None
            except UserError as e:  # the model for maps would not load here: the server cannot explain
                raise HTTPException(503, f"cannot explain: {e}") from None
        k = explanation.target
        return Response(png, media_type="image/png", headers={
            "X-Explained-Class": quote(predictor.classes_[k], safe=""), "X-Class-Index": str(k),
            "X-Class-Probability": f"{float(probs[k]):.6f}", "X-Method": explanation.method,
            "X-Layer": explanation.layer})

    @app.post("/predict/batch", response_model=BatchAnswer, responses=_errors({**BATCH_ERRORS, **unauthorised}),
              openapi_extra={"requestBody": BATCH_BODY, **guarded})
    async def predict_batch(request: Request):
        """Several images as multipart fields named `files`; one answer (or error) per image, in order."""
        _authorised(request)
        predictor = _predictor()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send a multipart form with the images in fields named 'files'")
        form = await _form(request, MAX_BATCH)
        try:
            files = [(u.filename, await u.read()) for u in form.getlist("files") if not isinstance(u, str)]
        finally:
            await form.close()
        if not files:
            raise HTTPException(422, "no images: send them in multipart fields named 'files'")
        results, arrays, index = [], [], []
        for k, (filename, data) in enumerate(files):
            try:
                arrays.append(await run_in_threadpool(predictor.decode, data))
                index.append(k)
                results.append(None)
            except DecodeError as e:
                results.append({"filename": filename, "error": f"not a usable image: {e}", "status": _status_for(e)})
        if arrays:
            probs = await run_in_threadpool(predictor.predict_arrays, arrays)
            for k, p in zip(index, probs):
                results[k] = {"filename": files[k][0], **_answer(predictor, p)}
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
    """Run uvicorn with `workers` processes, each loading the bundle once on the same engine."""
    import uvicorn

    from cnnlab.core.errors import UserError
    from cnnlab.models.checkpoint import load_bundle

    folder, info = load_bundle(path)  # a bad bundle fails here, before any worker starts
    if not 1 <= workers <= 64:
        raise UserError("--workers must be between 1 and 64")
    check_port(host, port)  # before the URL is announced: a taken port is one clear error, not a log line
    # an engine that cannot run here is one clear error now, not a traceback per worker; auto's choice is
    # said once and every worker runs the engine it chose
    engine = Predictor.load(folder, engine, threads, log=log).engine
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model")
    os.environ.update({"CNNLAB_SERVE_PATH": str(folder), "CNNLAB_SERVE_ENGINE": engine,
                       "CNNLAB_SERVE_THREADS": str(threads), "CNNLAB_SERVE_MAX_BODY": str(max_body),
                       "CNNLAB_SERVE_API_KEY": api_key})
    log(f"serving {info['model_name']} ({len(info['classes'])} classes) from {folder} on http://{host}:{port}/ "
        f"with {workers} worker(s)")
    uvicorn.run("cnnlab.serve.app:create_app", factory=True, host=host, port=port, workers=workers, **UVICORN)
