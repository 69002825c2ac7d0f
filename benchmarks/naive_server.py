"""The baseline: how typical pneumonia-classifier demo APIs serve a model.

One ``async def`` endpoint that reads the upload, decodes it with Pillow at FULL resolution,
converts to RGB, resizes with torchvision transforms and runs the model once per request,
blocking the event loop. It loads the very same exported network as the service, so any
difference measured against it comes from the serving path, not from the model.

Run: ``python -m benchmarks.naive_server --weights DIR --port N [--device cpu]``.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms

from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability


def create_app(weights: Path, device: str) -> FastAPI:
    """The demo-style app: a global model and a per-request transform pipeline."""
    loaded = load_model(weights)
    model = loaded.network.to(device).eval()
    size = loaded.metadata.spec.input_size
    to_input = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File()]) -> dict[str, float]:
        image = Image.open(io.BytesIO(await file.read())).convert("RGB")
        pixels = to_input(image).unsqueeze(0).to(device)
        with torch.no_grad():
            probability = float(pneumonia_probability(model(pixels))[0])
        return {"probability": probability}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    uvicorn.run(create_app(args.weights, args.device), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
