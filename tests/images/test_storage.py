"""Storage backends: a local folder, and S3 over HTTP against a real endpoint on loopback."""
from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdq.images.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    check_key,
    image_key,
    open_storage,
)
from tests.s3server import FlakyProxy, S3Server


def test_image_keys_come_from_ids_only() -> None:
    assert image_key(3, 17) == image_key(3, 17, 1) == "3/17.png"
    assert image_key(3, 17, 2) == "3/17-2.png"
    for bad in ("3", -1, True, 2.0):
        with pytest.raises(ValueError):
            image_key(bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempt must be an int >= 1"):
        image_key(3, 17, 0)


@pytest.mark.parametrize("key", ["", "../x.png", "/abs.png", "a//b.png", "a/../b.png",
                                 "a\\b.png", ".tmp-1-x.png", "a/./b", "caf\u00e9.png", "a b.png"])
def test_keys_that_could_escape_or_differ_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        LocalStorage(tmp_path).put(key, b"x")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield open_storage(str(tmp_path / "images"))
    else:
        bucket = request.getfixturevalue("bucket")
        server: S3Server = request.getfixturevalue("aws_env")
        yield open_storage(f"s3://{bucket}/sdq/images", endpoint_url=server.endpoint)


def test_put_get_list_exists_delete_url(store: Storage) -> None:
    store.check()
    store.put("3/17.png", b"first", metadata={"sha256": "00"})
    store.put("3/17.png", b"second")
    store.put("3/18.png", b"other")
    store.put("30/1.png", b"not job 3")
    assert store.get("3/17.png") == b"second"
    assert store.exists("3/17.png") and not store.exists("3/19.png")
    assert list(store.list("3/")) == ["3/17.png", "3/18.png"]
    assert list(store.list()) == ["3/17.png", "3/18.png", "30/1.png"]
    store.delete("3/17.png")
    store.delete("3/17.png")
    assert not store.exists("3/17.png")
    with pytest.raises(ObjectNotFound):
        store.get("3/17.png")


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("1/2.png", b"old")
    with pytest.raises(TypeError):
        store.put("1/2.png", "not bytes")  # type: ignore[arg-type]
    assert store.get("1/2.png") == b"old"
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["2.png"]


def test_local_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        LocalStorage(tmp_path).put("1/2.png", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "1" / "2.png").stat().st_mode & 0o777 == 0o644


def test_local_put_file(tmp_path: Path) -> None:
    source = tmp_path / "export.csv"
    source.write_bytes(b"a,b\n" * 1000)
    store = LocalStorage(tmp_path / "store")
    store.put_file("exports/1.csv", source, content_type="text/csv")
    assert store.get("exports/1.csv") == source.read_bytes()


def test_local_folder_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot use image folder"):
        LocalStorage(tmp_path / "file" / "images").check()


def test_storage_urls() -> None:
    assert isinstance(open_storage("/srv/images"), LocalStorage)
    local = open_storage("file:///srv/images")
    assert isinstance(local, LocalStorage) and local.root == Path("/srv/images")
    s3 = open_storage("s3://bucket/a/b/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "a/b")
    for bad in ("s3:///prefix", "gs://bucket/x", "s3://bucket/../x"):
        with pytest.raises(StorageError):
            open_storage(bad)


def test_put_sends_a_sha256_checksum_and_metadata(bucket: str, aws_env: S3Server) -> None:
    data = b"\x89PNG not really"
    open_storage(f"s3://{bucket}", endpoint_url=aws_env.endpoint).put(
        "1/2.png", data, metadata={"item": "2"})
    head = aws_env.client().head_object(Bucket=bucket, Key="1/2.png", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert head["ContentType"] == "image/png" and head["Metadata"] == {"item": "2"}


def test_endpoint_comes_from_the_standard_aws_variable(
        bucket: str, aws_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env.endpoint)
    open_storage(f"s3://{bucket}/prefix").put("1/2.png", b"x")
    listed = aws_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [entry["Key"] for entry in listed] == ["prefix/1/2.png"]


def test_large_upload_goes_in_parts(bucket: str, aws_env: S3Server, tmp_path: Path) -> None:
    source = tmp_path / "export.tar"
    source.write_bytes(os.urandom(11 * 2**20))
    store = S3Storage(bucket, endpoint_url=aws_env.endpoint, multipart_threshold=5 * 2**20)
    store.put_file("exports/1.tar", source, content_type="application/x-tar")
    etag = aws_env.client().head_object(Bucket=bucket, Key="exports/1.tar")["ETag"]
    assert etag.endswith('-3"')  # three parts: 5 + 5 + 1 MiB
    assert store.get("exports/1.tar") == source.read_bytes()


def test_missing_bucket_is_one_clear_error(aws_env: S3Server) -> None:
    store = open_storage("s3://no-such-bucket/x", endpoint_url=aws_env.endpoint)
    for action in (store.check, lambda: store.put("1/2.png", b"x"), lambda: store.get("1/2.png"),
                   lambda: list(store.list())):
        with pytest.raises(StorageError) as caught:
            action()
        message = str(caught.value)
        assert "'no-such-bucket'" in message and aws_env.endpoint in message
        assert "does not exist" in message and "\n" not in message


def test_wrong_credentials_are_one_clear_error(
        bucket: str, aws_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for key_id, secret in ((aws_env.access_key, "wrong"), ("AKIAUNKNOWN000000000", "wrong")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        store = open_storage(f"s3://{bucket}", endpoint_url=aws_env.endpoint)
        for action in (store.check, lambda: store.put("1/2.png", b"x")):
            with pytest.raises(StorageError, match="rejected the credentials") as caught:
                action()
            assert f"'{bucket}'" in str(caught.value) and aws_env.endpoint in str(caught.value)


def test_no_credentials_at_all(aws_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials for S3 bucket 'b'"):
        open_storage("s3://b", endpoint_url=aws_env.endpoint).put("1/2.png", b"x")


@pytest.mark.parametrize("mode", ["500", "503", "drop"])
def test_transient_failures_are_retried(mode: str, bucket: str, aws_env: S3Server) -> None:
    with FlakyProxy(aws_env.endpoint, failures=2, mode=mode) as proxy:  # type: ignore[arg-type]
        store = open_storage(f"s3://{bucket}", endpoint_url=proxy.endpoint)
        store.put("1/2.png", b"image")
        assert proxy.requests == 3
        assert store.get("1/2.png") == b"image"


def test_retries_are_bounded(bucket: str, aws_env: S3Server) -> None:
    with FlakyProxy(aws_env.endpoint, failures=100, mode="503") as proxy:
        store = open_storage(f"s3://{bucket}", endpoint_url=proxy.endpoint, max_attempts=2)
        with pytest.raises(StorageError, match=f"bucket '{bucket}' at {proxy.endpoint}"):
            store.put("1/2.png", b"image")
        assert proxy.requests == 2


def test_an_unreachable_or_foreign_endpoint_is_not_called_a_missing_bucket(aws_env: S3Server
                                                                            ) -> None:
    import http.server
    import socket
    import threading

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(StorageError) as caught:
        open_storage("s3://bucket/x", endpoint_url=closed, max_attempts=1).check()
    assert f"the S3 endpoint {closed} is unreachable" in str(caught.value)
    assert "does not exist" not in str(caught.value)

    class NotS3(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 (the handler's name is http.server's)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        web = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(StorageError) as caught:
            open_storage("s3://bucket/x", endpoint_url=web, max_attempts=1).check()
        assert "or the endpoint is not S3 (check AWS_ENDPOINT_URL)" in str(caught.value)
    finally:
        server.shutdown()
        server.server_close()
