"""The GPU image runs what the suite tests: every pin in docker/requirements-gpu.txt equals the
version installed here (image-only packages named), and the build-time smoke test the Dockerfile
runs (imports, a tiny Qwen2.5-VL prefill + generate with the shipped decoding) passes here."""
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# in the image only: the base image's CUDA torchvision, and the Kubernetes stack's S3 artifact store
IMAGE_ONLY = {"torchvision", "s3fs", "aiobotocore", "boto3", "botocore", "s3transfer", "aws-profile-manager",
              "python-rapidjson"}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, pinned = line.split("==")
            pins[re.sub(r"\[.*\]", "", name)] = pinned
    return pins


def test_every_pin_is_the_tested_version():
    pins = _pins()
    assert {"transformers", "accelerate", "peft", "torch", "deepspeed", "bitsandbytes"} <= set(pins)
    skew = {}
    for name, pinned in pins.items():
        if name in IMAGE_ONLY:
            continue
        try:
            installed = version(name).split("+")[0]  # torch 2.13.0+cpu here, the CUDA build there
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            skew[name] = (pinned, installed)
    assert skew == {}, f"docker/requirements-gpu.txt pins vs this environment: {skew}"


def test_the_build_time_smoke_test_runs_and_the_dockerfile_runs_it():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "COPY scripts/image_smoke.py" in dockerfile and "python scripts/image_smoke.py" in dockerfile
    res = subprocess.run([sys.executable, "scripts/image_smoke.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "image smoke OK: 6 captions, fast path == stock generate"
