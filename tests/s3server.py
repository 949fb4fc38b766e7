"""A real S3 endpoint on loopback for the storage tests, and a proxy that makes it fail.

The endpoint is moto's server in its own process, with IAM authentication switched on after
one test user is created, so that wrong credentials are refused the way AWS refuses them.
boto3 reaches it only over HTTP through `endpoint_url`; nothing in-process is patched.
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import boto3
import pytest

_ALLOW_ALL = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    """A running endpoint and the one access key it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]

    def client(self, endpoint: str | None = None):  # type: ignore[no-untyped-def]
        """A plain boto3 client for setting up and inspecting buckets in tests."""
        return boto3.session.Session(
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            region_name="us-east-1").client("s3", endpoint_url=endpoint or self.endpoint)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _set_authentication(endpoint: str, on: bool) -> None:
    """moto's switch: authenticate every request from now on, or none."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                     data=b"0" if on else b"inf",
                                     headers={"Content-Type": "text/plain"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def _wait_until_up(endpoint: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {endpoint} did not come up")


def start_s3_server() -> S3Server:
    """Start moto on a free loopback port, create an IAM user allowed everything, then make
    every later request authenticate (moto's `reset-auth` switch)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_up(endpoint, process)
        iam = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup",
                                    region_name="us-east-1").client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="sdq-test")
        iam.put_user_policy(UserName="sdq-test", PolicyName="all",
                            PolicyDocument=json.dumps(_ALLOW_ALL))
        key = iam.create_access_key(UserName="sdq-test")["AccessKey"]
        _set_authentication(endpoint, True)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)


FailureMode = Literal["500", "503", "drop"]
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "server", "date",
               "content-length"}


class FlakyProxy:
    """Loopback HTTP proxy in front of an endpoint: the first `failures` requests are
    answered 500/503 with an S3 error body, or have their connection closed unanswered;
    later ones are forwarded unchanged (Host included, so SigV4 signatures still verify)."""

    def __init__(self, upstream: str, failures: int, mode: FailureMode) -> None:
        self.upstream = urlparse(upstream)
        self.failures = failures
        self.mode = mode
        self.requests = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FlakyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        # A client's kept-alive connection holds its handler thread until it closes: end
        # them here, or they outlive the proxy for as long as the client object lives.
        with self._lock:
            for connection in self._open:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _should_fail(self) -> bool:
        with self._lock:
            self.requests += 1
            return self.requests <= self.failures

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                              timeout=30)
        try:
            upstream.request(method, path, body=body, headers=headers)
            response = upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            upstream.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._open.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._open.discard(self.connection)
                super().finish()

            def log_message(self, format: str, *args: object) -> None:
                """Silence the per-request log lines on stderr."""

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._should_fail():
                    if proxy.mode == "drop":
                        self.close_connection = True
                        return
                    code = "InternalError" if proxy.mode == "500" else "SlowDown"
                    self._reply(int(proxy.mode), [("Content-Type", "application/xml")],
                                f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
                                .encode())
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                self._reply(*proxy._forward(self.command, self.path, headers, body))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                sent_length = False
                for name, value in headers:
                    if name.lower() == "content-length" and self.command == "HEAD":
                        sent_length = True
                        self.send_header(name, value)
                    elif name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                if not sent_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


# Fixtures (registered for the whole suite by tests/conftest.py).

@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The standard AWS variables set for the test endpoint's user, and nothing read from the
    machine's own AWS files or instance metadata."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return s3_server


@pytest.fixture
def bucket(aws_env: S3Server) -> str:
    name = f"sdq-{uuid.uuid4().hex[:12]}"
    aws_env.client().create_bucket(Bucket=name)
    return name
