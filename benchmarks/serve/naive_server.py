"""The server a user would write first: FastAPI + uvicorn, one worker, PyTorch eager at batch 1,
PyTorch's default threads, torchvision transforms. The peer for benchmarks/serve_load.py.

    python benchmarks/serve/naive_server.py RUN_FOLDER PORT
"""

import io
import sys

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms

from cnnlab.models.checkpoint import load_model

model, meta = load_model(sys.argv[1])
size = meta["image_size"]
prep = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                           transforms.Normalize(meta["mean"], meta["std"])])
app = FastAPI()


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    image = Image.open(io.BytesIO(await file.read())).convert("RGB")
    with torch.no_grad():
        probs = torch.softmax(model(prep(image)[None]), 1)[0]
    return {c: float(p) for c, p in zip(meta["classes"], probs)}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
