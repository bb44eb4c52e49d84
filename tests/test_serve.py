"""Serving: `mlflow models serve` answers base64 PNGs with labels and probabilities, bad input with
400 and a message saying what is wrong, and keeps serving; plus the pyfunc decoder's input rules."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import read_csv_rows
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.data.cache import decode_one
from pipeline.ensemble.request import decode_request_image

NAME = "deepfake-ensemble"
PROBS = [f"prob_{i}" for i in range(5)]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ decoder rules (in process, fast)

def test_decoder_scales_16_bit_pngs_like_the_dataset_layer(tmp_path):
    rng = np.random.default_rng(0)
    deep = (rng.random((12, 12)) * 65535).astype(np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(deep))
    image = decode_request_image(path.read_bytes(), 0)
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 12)
    assert torch.equal(image, decode_one(path, None))


@pytest.mark.parametrize("make, message", [
    pytest.param(lambda: b"GIF89a" + b"\0" * 20, "row 0: 'image' is not a PNG or JPEG file", id="gif"),
    pytest.param(lambda: b"", "row 0: 'image' is empty", id="empty"),
    pytest.param(lambda: 7, "must be encoded image bytes, got int", id="number"),
    pytest.param(lambda: "%%% not base64 %%%", "not base64", id="bad-base64"),
    pytest.param(lambda: png_bytes(np.zeros((8, 8, 3), np.uint8))[:30], "row 0: cannot decode image", id="truncated"),
    # a small file that would decode to 50 MB: refused from its header, before decoding
    pytest.param(lambda: png_bytes(np.zeros((4097, 4097), np.uint8)), "4097x4097 pixels is too large", id="bomb"),
])
def test_decoder_rejects_bad_input_with_a_400_message(make, message):
    with pytest.raises(MlflowException, match=message) as info:
        decode_request_image(make(), 0)
    assert info.value.get_http_status_code() == 400


def test_a_large_request_decodes_in_threads_in_order_and_names_the_first_bad_row():
    from pipeline.ensemble.request import DECODE_THREADS, decode_request_images

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8 + i, 10 + i, 3), dtype=np.uint8) for i in range(3 * DECODE_THREADS)]
    values = [png_bytes(a) for a in arrays]
    decoded = decode_request_images(values)
    assert [tuple(d.shape) for d in decoded] == [(3, a.shape[0], a.shape[1]) for a in arrays]  # in order
    assert all(np.array_equal(d.permute(1, 2, 0).numpy(), a) for d, a in zip(decoded, arrays, strict=True))
    bad = list(values)
    bad[5], bad[9] = b"GIF89a" + b"\0" * 20, b""
    with pytest.raises(MlflowException, match="row 5: 'image' is not a PNG or JPEG file"):
        decode_request_images(bad)


# ------------------------------------------------------------------ the real server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload, timeout: float = 120) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"message": text.decode(errors="replace")}


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


@pytest.fixture(scope="module")
def server(tuned, tmp_path_factory):
    """`mlflow models serve` of @champion (set on a copy of the tuned store) on a free loopback port."""
    root = tmp_path_factory.mktemp("serve")
    shutil.copy2(tuned.workdir / "mlflow.db", root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias(NAME, "challenger").version
    client.set_registered_model_alias(NAME, "champion", version)
    port = free_port()
    bin_dir = Path(sys.executable).parent  # uvicorn lives beside this interpreter
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(root)}
    env.pop("MLFLOW_RUN_ID", None)
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in 180 s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, version
    finally:
        # The server runs in its own session: stop its process group (mlflow and the uvicorn it starts).
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="module")
def images(tuned):
    ids = [row["image_id"] for row in read_csv_rows(tuned.data / "test.csv")][:3]
    return [(tuned.data / "test" / f"{i}.png").read_bytes() for i in ids]


@pytest.mark.slow
def test_served_champion_answers_like_the_pyfunc_model(server, images, tuned, monkeypatch):
    import mlflow.pyfunc

    base, version = server
    url = f"{base}/invocations"
    status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[b64(x)] for x in images]}})
    assert status == 200, body
    predictions = pd.DataFrame(body["predictions"])
    assert list(predictions.columns) == ["label", *PROBS] and len(predictions) == 3
    assert set(predictions["label"]) <= set(range(5))
    np.testing.assert_allclose(predictions[PROBS].sum(axis=1), 1.0, atol=1e-5)

    tuned.use(monkeypatch)
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}").predict(pd.DataFrame({"image": images}))
    assert predictions["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(predictions[PROBS].to_numpy(), expected[PROBS].to_numpy(), atol=1e-6)

    status, body = post(url, {"dataframe_records": [{"image": b64(images[1])}]})
    assert status == 200 and body["predictions"][0]["label"] == expected["label"][1]

    # JPEG, at another size than the members were trained at: answered like the same bytes in-process.
    buf = io.BytesIO()
    Image.open(io.BytesIO(images[2])).convert("RGB").resize((40, 40)).save(buf, format="JPEG", quality=85)
    jpeg = buf.getvalue()
    status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[b64(jpeg)]]}})
    assert status == 200, body
    local = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}").predict(pd.DataFrame({"image": [jpeg]}))
    served = pd.DataFrame(body["predictions"])
    assert served["label"].tolist() == local["label"].tolist()
    np.testing.assert_allclose(served[PROBS].to_numpy(), local[PROBS].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_bad_requests_get_400_and_the_server_keeps_serving(server, images):
    base, _ = server
    url = f"{base}/invocations"

    def split(*rows) -> dict:
        return {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}

    cases = [
        (split(b64(images[0]), b64(b"hello, not an image")), "row 1: 'image' is not a PNG or JPEG file"),
        (split(12345), "Failed to convert column image"),  # a number where base64 bytes belong
        (split(b64(images[0][:60])), "row 0: cannot decode image"),  # a truncated PNG
        ({"dataframe_split": {"columns": ["picture"], "data": [[b64(images[0])]]}}, "missing inputs ['image']"),
        (split("this is not base64!"), "Failed to convert column image"),
        (b"{not json", "valid JSON"),
    ]
    for payload, message in cases:
        status, body = post(url, payload)
        assert status == 400, (payload if isinstance(payload, bytes) else str(payload)[:200], body)
        assert message in body["message"], body["message"][-500:]

    # ~15 MB of bogus image: refused (by the model's 10 MB limit, or earlier by the server) with a 4xx.
    huge = b"\x89PNG\r\n\x1a\n" + os.urandom(15 * 1024 * 1024)
    status, body = post(url, split(b64(huge)))
    assert 400 <= status < 500
    if status == 400:
        assert "exceeds the 10485760-byte limit" in body["message"]

    status, body = post(url, split(b64(images[2])))  # still serving
    assert status == 200 and len(body["predictions"]) == 1
