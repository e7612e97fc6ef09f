"""`mlflow models serve` of the registered pyfunc: MLflow's own scoring app (in process, no port)
answers a batch with one bad image with 200, an error for that row and captions for the
others, and never sends a stack trace to the client."""
import base64

import mlflow
import pytest
from fastapi.testclient import TestClient
from mlflow.pyfunc import scoring_server

from ecomcap.data.formats import encode_base64
from ecomcap.registry.pyfunc import log_pyfunc
from tests.conftest import make_image


@pytest.fixture(scope="module")
def app(merged, tmp_path_factory):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('serve')}/mlflow.db")
    with mlflow.start_run():
        uri = log_pyfunc(merged).model_uri
    return TestClient(scoring_server.init(mlflow.pyfunc.load_model(uri)))


def test_one_bad_image_costs_one_row(app):
    good = encode_base64(make_image("red", (112, 112)))
    thin = encode_base64(make_image("red", (600, 2), fmt="PNG"))  # Qwen's processor refuses > 200:1
    rows = [["ok1", good], ["not_b64", "!!!not base64!!!"], ["not_image", base64.b64encode(b"plain text").decode()],
            ["thin", thin], ["ok2", good]]
    resp = app.post("/invocations", json={"dataframe_split": {"columns": ["image_id", "image"], "data": rows}})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert [p["image_id"] for p in preds] == ["ok1", "not_b64", "not_image", "thin", "ok2"]
    assert preds[0]["error"] == preds[4]["error"] == "" and preds[0]["caption"] == preds[4]["caption"]
    assert preds[1]["error"].startswith("unusable image") and preds[1]["caption"] == ""
    assert preds[2]["error"].startswith("unusable image") and "BytesIO" not in preds[2]["error"]
    assert "extreme_aspect_ratio" in preds[3]["error"] and preds[3]["caption"] == ""
    assert "Traceback" not in resp.text and "stack_trace" not in resp.text


def test_a_request_without_images_is_refused_without_a_stack_trace(app):
    resp = app.post("/invocations", json={"dataframe_split": {"columns": ["x"], "data": [[1]]}})
    assert resp.status_code == 400 and "image" in resp.json()["message"]
    assert "Traceback" not in resp.text and not resp.json().get("stack_trace")
