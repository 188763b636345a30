"""The HTTP ceiling for benchmarks/serve_load.py: a bare one-route FastAPI app (reads the upload, answers a
small fixed JSON, no model, no multipart parsing) under `cnnlab serve`'s own uvicorn settings and workers.

    python benchmarks/serve/bare_app.py PORT WORKERS
"""

import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request

from cnnlab.serve.app import UVICORN  # the loop, HTTP parser and logging settings `cnnlab serve` runs with


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        await request.body()
        return {"prediction": "cat", "probability": 1.0}

    return app


if __name__ == "__main__":
    uvicorn.run("bare_app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
                workers=int(sys.argv[2]), app_dir=str(Path(__file__).parent), **UVICORN)
