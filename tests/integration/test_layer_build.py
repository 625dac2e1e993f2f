"""What ships is what runs: the layer holds the runtime package and its requirements, nothing a
test, the sandbox or the CLI needs, and every shipped module imports with only those plus the
boto3 that Lambda's runtime provides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYER_SOURCE = ROOT / "layers" / "mailbroker"


def _pip_install(target: Path, *args: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(target),
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def staged_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layer as `sam build` stages it (the same Makefile target), for this machine's platform
    so that its modules can be imported here."""
    artifacts = tmp_path_factory.mktemp("layer")
    env = {**os.environ, "ARTIFACTS_DIR": str(artifacts)}
    subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(LAYER_SOURCE),
            "build-MailbrokerLayer",
            f"PYTHON={sys.executable}",
            "PLATFORM_FLAGS=",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return artifacts / "python"


def _shipped_modules(python_dir: Path) -> list[str]:
    package = python_dir / "mailbroker"
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(python_dir).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_built_layer_holds_no_sandbox_no_cli_and_no_dev_packages(staged_layer: Path):
    top_level = {p.name for p in staged_layer.iterdir()}
    assert "mailbroker" in top_level
    assert not {"mailbroker_cli", "mailbroker_sandbox", "tests", "bench"} & top_level
    assert not (staged_layer / "mailbroker" / "sandbox").exists()
    assert not (staged_layer / "mailbroker" / "cli").exists()
    for dev_only in ("moto", "aiosmtpd", "yaml", "pytest", "hypothesis", "google_auth_oauthlib"):
        assert not (staged_layer / dev_only).exists(), dev_only
    # Lambda's runtime provides these: a second copy would only double the layer.
    for runtime_provided in ("boto3", "botocore", "s3transfer"):
        assert not (staged_layer / runtime_provided).exists(), runtime_provided
    assert not list(staged_layer.rglob("__pycache__"))


def test_every_shipped_module_imports_with_only_the_layer_and_the_runtime_boto3(
    staged_layer: Path, tmp_path: Path
):
    runtime = tmp_path / "runtime"
    _pip_install(runtime, "boto3")
    modules = _shipped_modules(staged_layer)
    assert "mailbroker.handlers.sender" in modules
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    # -S: no site-packages, so nothing of this checkout's venv can stand in for a missing module.
    result = subprocess.run(
        [sys.executable, "-S", "-c", script, *modules],
        env={
            "PYTHONPATH": os.pathsep.join([str(staged_layer), str(runtime)]),
            "PATH": os.environ.get("PATH", ""),
            "AWS_DEFAULT_REGION": "us-east-1",
            "POWERTOOLS_SERVICE_NAME": "mailbroker",
        },
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]


SIGN_WITH_BOTH_TOKEN_LIBRARIES = """
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
pem = key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
from google.auth import crypt
from google.oauth2 import service_account
signer = crypt.RSASigner.from_string(pem)
assert signer.sign(b"payload")
service_account.Credentials.from_service_account_info(
    {"client_email": "a@b.iam.gserviceaccount.com", "private_key": pem,
     "token_uri": "https://oauth2.googleapis.com/token"}
)
from msal.oauth2cli.assertion import JwtAssertionCreator
assertion = JwtAssertionCreator(pem, "RS256", sha1_thumbprint="00" * 20)
assert assertion.create_regenerative_assertion(audience="a", issuer="b")
left_out = {"pyasn1", "pyasn1_modules", "dateutil", "six", "cffi", "pycparser"} & set(sys.modules)
assert not left_out, left_out
"""


def test_both_token_libraries_sign_without_the_dependencies_the_layer_leaves_out(
    staged_layer: Path, tmp_path: Path
):
    for left_out in ("pyasn1", "pyasn1_modules", "dateutil", "six.py", "cffi", "pycparser"):
        assert not (staged_layer / left_out).exists(), left_out
    assert not list(staged_layer.rglob("*.pyi"))
    assert not list(staged_layer.glob("*.dist-info/RECORD"))
    result = subprocess.run(
        [sys.executable, "-S", "-c", SIGN_WITH_BOTH_TOKEN_LIBRARIES],
        env={"PYTHONPATH": str(staged_layer), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]


GUESS_AN_ENCODING_WITHOUT_THE_COMPILED_ACCELERATORS = """
import charset_normalizer, requests
text = "Grüße aus Köln, das Paket ist unterwegs. " * 10
best = charset_normalizer.from_bytes(text.encode("utf-8")).best()
assert best is not None and str(best) == text, best
response = requests.models.Response()
response._content = "café".encode("utf-8")
assert response.apparent_encoding.lower().replace("_", "-") in {"utf-8", "utf8"}
import sys
compiled = [m for m in ("charset_normalizer.md", "charset_normalizer.cd")
            if sys.modules[m].__file__.endswith(".so")]
assert not compiled, compiled
"""


def test_charset_detection_runs_on_pure_python_without_the_files_the_layer_leaves_out(
    staged_layer: Path, tmp_path: Path
):
    assert not list((staged_layer / "charset_normalizer").glob("*.so"))
    assert not list(staged_layer.glob("wrapt/*.c"))
    assert not (staged_layer / "bin").exists()
    result = subprocess.run(
        [sys.executable, "-S", "-c", GUESS_AN_ENCODING_WITHOUT_THE_COMPILED_ACCELERATORS],
        env={"PYTHONPATH": str(staged_layer), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_api_never_enables_swagger_whose_assets_the_layer_leaves_out():
    package = ROOT / "layers" / "mailbroker" / "mailbroker"
    sources = "\n".join(p.read_text() for p in package.rglob("*.py"))
    assert "enable_swagger" not in sources
