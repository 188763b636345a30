"""What the serving API answers, as pydantic models: the response schemas in `/openapi.json` (serve/app.py).

pydantic is used only here. Every model but `Metrics` (and the engines' records) forbids keys it does not
name (`additionalProperties: false`), so a key added to an answer without being documented here fails the
schema-driven fuzzer (tests/test_openapi.py) instead of reaching clients undocumented.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Probability = Annotated[float, Field(ge=0, le=1)]
Engine = Annotated[str, Field(description="what runs the model: onnxruntime, pytorch, ...")]


class Closed(BaseModel):
    """An answer with exactly these keys."""

    model_config = ConfigDict(extra="forbid")


class Prediction(Closed):
    """One image's answer."""

    prediction: str = Field(description="the most probable class")
    probability: Probability = Field(description="its probability, rounded to 6 decimals")
    uncertain: bool = Field(description="whether that probability is under the bundle's `uncertain_below`")
    probabilities: dict[str, Probability] = Field(description="every class's probability, the most probable first")
    model: str = Field(description="the model's name")


class FilePrediction(Prediction):
    """One image of a batch, classified."""

    filename: str


class FileError(Closed):
    """One file of a batch that is not a usable image: the status a single upload of it would have got."""

    filename: str
    error: str
    status: Literal[413, 415, 422] = Field(description="413 decompression bomb, 415 not an image, 422 damaged")


class BatchAnswer(Closed):
    results: list[FilePrediction | FileError] = Field(min_length=1, description="one per file, in upload order")


class Metrics(BaseModel):
    """The test-set metrics in bundle.json: open, since the exporter chooses which it records."""

    model_config = ConfigDict(extra="allow")
    accuracy: float | None = None
    f1_macro: float | None = None
    precision_macro: float | None = None
    recall_macro: float | None = None
    loss: float | None = None
    n: int | None = None


class Preprocessing(Closed):
    """How an image becomes the model's input."""

    image_size: int
    crop: float
    mean: list[float]
    std: list[float]
    input_size: int | None
    steps: str


class ModelInfo(Closed):
    """`/model`: the classes and the bundle's record (a key an older bundle lacks is null)."""

    classes: list[str]
    model_name: str | None
    metrics: Metrics | None
    uncertain_below: float | None
    threshold_from: str | None
    cnnlab_version: str | None
    split_sha256: str | None
    run: str | None
    preprocessing: Preprocessing
    temperature: float = Field(gt=0, description="every probability is softmax(logits / temperature), fitted on "
                               "validation data (1: not calibrated)")
    engine: Engine
    engines: dict[str, dict[str, Any]] | None = Field(None, description="each engine's measurements at export")


class Alive(Closed):
    status: Literal["alive"]


class Ready(Closed):
    status: Literal["ready"]
    engine: Engine


class Loading(Closed):
    status: Literal["loading"]


class ErrorBody(Closed):
    """Every error answer of the app (HTTPException's body)."""

    detail: str
