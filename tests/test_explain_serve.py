"""`POST /explain` and the page's "show why" switch: the map's PNG from the real server (uvicorn on 127.0.0.1),
its refusals, the API key, /predict answered while a map is being computed (an in-process app whose
explanation is held at a gate), and the switch and the clickable bars in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import threading
from pathlib import Path
from urllib.parse import unquote

import httpx
import numpy as np
from hostile import png_bomb
from PIL import Image
from test_serve import _hostile_requests

ARTIFACTS = Path(__file__).parent / "artifacts"


def _test_image(trained: Path, cifar_root: Path, k: int = 0) -> Path:
    return cifar_root / list(csv.DictReader(open(trained / "predictions.csv")))[k]["path"]


def _pixels(png: bytes) -> np.ndarray:
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.mode == "RGB", (picture.format, picture.mode)
    return np.asarray(picture)


def test_explain_answers_the_maps_png(server, trained, cifar_root):
    from cnnlab.evaluate.explain import display_side, overlay
    from cnnlab.evaluate.predict import Predictor

    data = _test_image(trained, cifar_root).read_bytes()
    with httpx.Client(base_url=server, timeout=60) as client:
        classes = client.get("/model").json()["classes"]
        predicted = client.post("/predict", content=data).json()
        r = client.post("/explain", content=data)  # no class: the predicted one
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert _pixels(r.content).shape == (192, 192, 3)  # a 32 px image enlarged to display_side's 192
        assert unquote(r.headers["x-explained-class"]) == predicted["prediction"]
        assert r.headers["x-class-index"] == str(classes.index(predicted["prediction"]))
        assert r.headers["x-method"] == "gradcam" and r.headers["x-layer"]
        # the same decoding, engine and temperature as /predict: the same probability
        assert abs(float(r.headers["x-class-probability"]) - predicted["probability"]) <= 1e-6
        other = list(predicted["probabilities"])[-1]  # the least probable class, named, in a multipart form
        named = client.post("/explain", params={"class": other}, files={"file": ("a.jpg", data, "image/jpeg")})
        assert named.status_code == 200, named.text
        assert unquote(named.headers["x-explained-class"]) == other
        assert abs(float(named.headers["x-class-probability"]) - predicted["probabilities"][other]) <= 1e-6
        assert _pixels(named.content).shape == (192, 192, 3)
        assert named.content != r.content  # another class, another map
        by_index = client.post("/explain", params={"class": str(classes.index(other))}, content=data)
        assert by_index.status_code == 200 and by_index.content == named.content
        plus = client.post("/explain", params={"method": "gradcam++"}, content=data)  # httpx sends the + as %2B
        assert plus.status_code == 200 and plus.headers["x-method"] == "gradcam++", plus.text
        metrics = client.get("/metrics").text
    assert 'cnnlab_requests_total{path="/explain",status="200"}' in metrics
    # the served picture is Predictor.explain's map drawn by explain.overlay (to a rounding of the uint8 colours:
    # the server runs PyTorch on one thread, this process on several)
    predictor = Predictor.load(trained / "bundle", "onnx", log=lambda *a: None)
    explanation, _ = predictor.explain(data, other)
    want = overlay(explanation.image, explanation.cam, display_side(predictor.image_size))
    assert np.abs(_pixels(named.content).astype(int) - want.astype(int)).max() <= 1


def test_explain_refuses_what_predict_refuses_and_unknown_choices(server, trained, cifar_root):
    from cnnlab.evaluate.explain import METHODS

    data = _test_image(trained, cifar_root).read_bytes()
    with httpx.Client(base_url=server, timeout=60) as client:
        classes = client.get("/model").json()["classes"]
        cases = [  # (name, request kwargs, status, words the detail must hold)
            ("text body", {"content": b"hello"}, 415, ["not a usable image"]),
            ("empty body", {"content": b""}, 415, ["empty upload"]),
            ("png bomb", {"content": png_bomb(100_000, 100_000)}, 413, ["not a usable image"]),
            ("truncated jpeg", {"content": data[:300]}, (415, 422), ["not a usable image"]),
            ("multipart without a file", {"files": {"other": ("a.jpg", data, "image/jpeg")}}, 422, ["'file'"]),
            ("unknown class", {"params": {"class": "no-such-class"}, "content": data}, 422, classes),
            ("index past the classes", {"params": {"class": str(len(classes))}, "content": data}, 422, classes),
            ("a digit int() refuses", {"params": {"class": "²"}, "content": data}, 422, classes),
            ("empty class", {"params": {"class": ""}, "content": data}, 422, classes),
            ("unknown method", {"params": {"method": "gradcam+"}, "content": data}, 422, list(METHODS)),
            # the query is checked before the body is read: a bad choice is named even with a bad body
            ("unknown method, text body", {"params": {"method": "nope"}, "content": b"hello"}, 422, list(METHODS)),
        ]
        for name, kw, status, words in cases:
            r = client.post("/explain", **kw)
            assert r.status_code in (status if isinstance(status, tuple) else (status,)), (name, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json", name
            detail = r.json()["detail"]
            assert isinstance(detail, str) and all(w in detail for w in words), (name, detail)
        for name, kw in _hostile_requests(data):  # /predict's barrage: never a 5xx here either
            ok = kw.pop("ok", False)
            r = client.post("/explain", **kw)
            assert r.status_code < 500 and (ok or 400 <= r.status_code < 500), (name, r.status_code, r.text[:200])
        assert client.get("/livez").status_code == 200 and client.post("/explain", content=data).status_code == 200


def test_api_key_guards_explain(trained, cifar_root):
    from fastapi.testclient import TestClient

    from cnnlab.serve.app import create_app

    data = _test_image(trained, cifar_root).read_bytes()
    with TestClient(create_app(str(trained / "bundle"), engine="onnx", api_key="s3cret")) as client:
        for headers in ({}, {"X-API-Key": "wrong"}):
            r = client.post("/explain", content=data, headers=headers)
            assert r.status_code == 401 and "X-API-Key" in r.json()["detail"], r.text
        r = client.post("/explain", content=data, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text


def test_an_explanation_never_holds_up_predict(trained, cifar_root, monkeypatch):
    """/predict is answered while an explanation is held at a gate in its worker thread (were the map computed
    on the event loop, nothing would be answered until the gate's timeout); one map at a time; and the PyTorch
    model is loaded by the first /explain only, never at start-up or by /predict."""
    from cnnlab.evaluate import predict as predict_module
    from cnnlab.evaluate.predict import Predictor
    from cnnlab.serve.app import create_app

    data = _test_image(trained, cifar_root).read_bytes()
    loads: list = []
    load_model = predict_module.load_model
    monkeypatch.setattr(predict_module, "load_model", lambda *a, **kw: (loads.append(a), load_model(*a, **kw))[1])
    gate, entered, guard = threading.Event(), [threading.Event() for _ in range(3)], threading.Lock()
    calls = {"entered": 0, "inside": 0, "most": 0}  # "most": the most explanations inside at once
    explain = Predictor.explain

    def held(self, *args, **kwargs):
        with guard:
            k = calls["entered"]
            calls["entered"], calls["inside"] = k + 1, calls["inside"] + 1
            calls["most"] = max(calls["most"], calls["inside"])
        entered[min(k, 2)].set()
        try:
            assert gate.wait(15), "the gate was never opened"
            return explain(self, *args, **kwargs)
        finally:
            with guard:
                calls["inside"] -= 1

    monkeypatch.setattr(Predictor, "explain", held)

    async def scenario():
        app = create_app(str(trained / "bundle"), engine="onnx", threads=1)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://in-process", timeout=60) as client:
            assert not loads, "start-up loaded a PyTorch model"
            for _ in range(3):
                assert (await client.post("/predict", content=data)).status_code == 200
            batch = await client.post("/predict/batch", files=[("files", ("a.jpg", data, "image/jpeg"))])
            assert batch.status_code == 200 and not loads, "/predict loaded the explainer's model"
            first = asyncio.create_task(client.post("/explain", content=data))
            second = asyncio.create_task(client.post("/explain", params={"class": "1"}, content=data))
            assert await asyncio.to_thread(entered[0].wait, 15), "no explanation started"
            r = await asyncio.wait_for(client.post("/predict", content=data), 15)
            assert r.status_code == 200 and not first.done() and not second.done()
            # the lock: the second explanation waits on the event loop (given a second to get in, it does not)
            assert not await asyncio.to_thread(entered[1].wait, 1), "two explanations ran at once"
            assert not loads
            gate.set()
            answers = await asyncio.wait_for(asyncio.gather(first, second), 60)
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            assert answers[1].headers["x-class-index"] == "1"
            assert (await client.post("/explain", content=data)).status_code == 200
            assert (await client.post("/predict", content=data)).status_code == 200
        assert calls["entered"] == 3 and calls["most"] == 1, calls  # three maps, never two at once
        assert len(loads) == 1, loads  # loaded by the first /explain, kept for the next

    asyncio.run(scenario())


def test_page_shows_why_in_headless_chromium(server, trained, cifar_root, chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    image = _test_image(trained, cifar_root, 2)
    wait = WebDriverWait(chrome, 30)  # every wait below: at most 30 s
    chrome.get(server + "/")
    chrome.find_element(By.ID, "file").send_keys(str(image))
    chrome.find_element(By.ID, "classify").click()
    wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
    prediction = chrome.find_element(By.ID, "prediction").text
    why = chrome.find_element(By.XPATH, "//label[contains(., 'show why')]/input[@id='why' and @type='checkbox']")
    preview, picture = chrome.find_element(By.ID, "preview"), chrome.find_element(By.ID, "overlay")
    caption = chrome.find_element(By.ID, "caption")
    assert not why.is_selected() and preview.is_displayed() and not picture.is_displayed()

    why.click()  # the predicted class's map, in place of the upload
    wait.until(lambda d: picture.is_displayed() and caption.get_attribute("data-class") == prediction)
    assert not preview.is_displayed() and prediction in caption.text and "prediction" in caption.text
    assert chrome.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", picture) == [192, 192]

    rows = chrome.find_elements(By.CSS_SELECTOR, "#bars .row")
    other = rows[-1].get_attribute("data-class")  # the least probable class: never the prediction
    assert rows[-1].value_of_css_property("cursor") == "pointer"
    rows[-1].find_element(By.CSS_SELECTOR, ".bar").click()
    wait.until(lambda d: caption.get_attribute("data-class") == other and picture.get_attribute("data-class") == other)
    assert other in caption.text and prediction != other
    chosen = chrome.find_elements(By.CSS_SELECTOR, "#bars .row.chosen")
    assert [r.get_attribute("data-class") for r in chosen] == [other] and rows[-1].get_attribute("aria-pressed") == "true"
    # what the page shows is /explain's PNG for that class, byte for byte
    shown = chrome.execute_async_script(
        "const done = arguments[arguments.length - 1]; fetch(arguments[0].src).then(r => r.arrayBuffer())"
        ".then(b => done(btoa(String.fromCharCode(...new Uint8Array(b)))));", picture)
    api = httpx.post(f"{server}/explain", params={"class": other}, content=image.read_bytes(), timeout=60)
    assert base64.b64decode(shown) == api.content
    ARTIFACTS.mkdir(exist_ok=True)
    chrome.save_screenshot(str(ARTIFACTS / "serve_explain.png"))
    # the screenshot shows the overlay: its pixels where the picture is are the PNG's (drawn unscaled, 192 px)
    box = picture.rect
    left, top = round(box["x"]), round(box["y"])
    screen = np.asarray(Image.open(ARTIFACTS / "serve_explain.png").convert("RGB"))[top:top + 192, left:left + 192]
    assert screen.shape == (192, 192, 3) and np.abs(screen.astype(int) - _pixels(api.content).astype(int)).mean() < 4

    third = rows[1].get_attribute("data-class")  # the keyboard: Enter on a focused row
    rows[1].send_keys(Keys.ENTER)
    wait.until(lambda d: caption.get_attribute("data-class") == third)
    assert third in caption.text

    why.click()  # off: the plain upload again
    wait.until(lambda d: preview.is_displayed() and not picture.is_displayed())
    assert caption.text == "" and not chrome.find_elements(By.CSS_SELECTOR, "#bars .row.chosen")

    chrome.execute_script("explain('no-such-class')")  # an /explain error is shown where /predict's are
    error = chrome.find_element(By.ID, "error")
    wait.until(lambda d: "Could not explain" in error.text)
    assert "is not one of the model's classes" in error.text and preview.is_displayed() and not why.is_selected()
