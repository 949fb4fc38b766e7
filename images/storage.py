"""Where images live: a local folder (the embedded default) or any S3-compatible store.

One setting (`SDQ_STORAGE_URL`) picks the backend: `s3://bucket/prefix` for S3, anything else
is a folder. S3 endpoint, region, credentials and addressing style come from boto3's standard
chain (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, `~/.aws/config`, ...), so AWS S3, MinIO and R2 need
no sdq-specific knobs. Keys are built from ids only (`image_key`) and validated by both
backends, so no user text can reach a path or an object name.

Failures reach users as one `StorageError` whose message names the bucket and endpoint (the
CLI prints it as a single line): a wrong bucket or rejected credentials is a configuration
mistake to fix, not a traceback to read.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlparse

from sdq.core.errors import Unavailable
from sdq.core.init_image import check_sha256
from sdq.sdmodel.files import TEMP_PREFIX, atomic_writer

if TYPE_CHECKING:
    from sdq.core.settings import Settings

# A hidden name (one leading dot) is allowed, for files that folder readers must skip; temp
# files' names are not.
_SEGMENT = re.compile(rf"^(?!{re.escape(TEMP_PREFIX)})\.?[A-Za-z0-9][A-Za-z0-9._-]*$")


class StorageError(Unavailable):
    """A storage operation failed; the message is one line meant for the user."""


class ObjectNotFound(StorageError):
    """The key does not exist (the bucket or folder does)."""


def image_key(job_id: int, item_id: int, attempt: int = 1) -> str:
    """The key of an item's image from one claim: `{job}/{item}.png` for the first attempt,
    `{job}/{item}-{attempt}.png` for later ones. Deterministic, so a claim that uploads twice
    overwrites its own object; distinct per attempt, so a worker whose claim was taken over
    while it uploaded can never overwrite the image the new holder recorded."""
    for name, value, low in (("job_id", job_id, 0), ("item_id", item_id, 0), ("attempt", attempt, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return f"{job_id}/{item_id}.png" if attempt == 1 else f"{job_id}/{item_id}-{attempt}.png"


INIT_PREFIX = "init/"
"""Where init images are stored, each under its sha256: a prefix no job's images use (their
keys begin with the job id)."""


def init_key(sha256: str) -> str:
    """The key of an init image's file: `init/{sha256}`, content-addressed, so the same bytes
    submitted by any job, any night, are one object."""
    return f"{INIT_PREFIX}{check_sha256(sha256)}"


def check_key(key: str) -> str:
    """Refuse keys that could escape the root or differ between backends (`..`, absolute
    paths, backslashes, empty segments, temp-file names)."""
    if not all(_SEGMENT.match(part) for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: use /-separated [A-Za-z0-9._-] names")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix:
        check_key(prefix.rstrip("/") or "/")
    return prefix


class Storage(ABC):
    """Put, get and list image bytes by key."""

    @abstractmethod
    def check(self) -> None:
        """Fail now, with a clear StorageError, if the store cannot be used (workers call this
        at start instead of discovering a typo after the first image is generated)."""

    @abstractmethod
    def put(self, key: str, data: bytes, *, content_type: str = "image/png",
            metadata: Mapping[str, str] | None = None) -> None:
        """Store `data` atomically: readers see the old object or the whole new one."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, content_type: str) -> None:
        """Store a file too large to hold in memory (exports); S3 uploads it in parts."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound when there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (retries are safe)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix`, in lexicographic order."""


class LocalStorage(Storage):
    """A folder. Content type and metadata are not kept: the PNG carries its own provenance.

    Writes go to a temp file in the destination folder, are fsynced and renamed over the
    key, so a crash never leaves a truncated image under a valid key.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot use image folder {self.root}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"image folder {self.root} is not writable")

    @contextlib.contextmanager
    def _atomic(self, key: str) -> Iterator[BinaryIO]:
        target = self._path(key)
        try:
            with atomic_writer(target) as out:
                yield out
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from None

    def put(self, key: str, data: bytes, *, content_type: str = "image/png",
            metadata: Mapping[str, str] | None = None) -> None:
        with self._atomic(key) as out:
            out.write(data)

    def put_file(self, key: str, path: Path, *, content_type: str) -> None:
        with open(path, "rb") as source, self._atomic(key) as out:
            shutil.copyfileobj(source, out)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in image folder {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the folder the prefix pins down: listing one job must not scan them all.
        folder = self.root.joinpath(*_check_prefix(prefix).split("/")[:-1])
        keys = (
            path.relative_to(self.root).as_posix()
            for path in folder.rglob("*")
            if path.is_file() and not path.name.startswith(TEMP_PREFIX)
        )
        yield from sorted(key for key in keys if key.startswith(prefix))


# Error codes by which S3 and compatible stores reject credentials or signatures.
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
               "ExpiredToken", "TokenRefreshRequired", "403", "Forbidden"}
_CREDENTIALS = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"


class S3Storage(Storage):
    """A bucket (and optional key prefix) on any S3-compatible endpoint.

    Transient failures (5xx, throttling, dropped connections) are retried by botocore's
    "standard" retry mode with jittered exponential backoff, up to `max_attempts` in all.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 max_attempts: int = 5, multipart_threshold: int = 64 * 2**20) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        # SigV4 everywhere: R2 and new AWS regions accept nothing else, presigned URLs included.
        config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                        signature_version="s3v4", connect_timeout=10, read_timeout=60)
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                                      config=config)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=max(multipart_threshold, 5 * 2**20))
        self.endpoint = self._client.meta.endpoint_url

    def __repr__(self) -> str:
        return f"S3Storage({self.bucket!r}, {self.prefix!r}, endpoint_url={self.endpoint!r})"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn boto3's exceptions into one StorageError naming the bucket and endpoint."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
        )
        from botocore.exceptions import ConnectionError as Unreachable

        where = f"bucket {self.bucket!r} at {self.endpoint}"
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code == "NoSuchBucket":
                raise StorageError(f"S3 {where} does not exist") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"{doing}: no such object in S3 {where}") from None
            if code in _AUTH_CODES:
                raise StorageError(
                    f"S3 {where} rejected the credentials ({code}); {_CREDENTIALS}") from None
            message = error.get("Message") or exc
            raise StorageError(f"{doing} failed on S3 {where}: {code} {message}") from None
        except NoCredentialsError:
            raise StorageError(f"no AWS credentials for S3 {where}; {_CREDENTIALS}") from None
        except Unreachable as exc:  # refused, timed out, no such host: never reached S3
            raise StorageError(f"{doing}: the S3 endpoint {self.endpoint} is unreachable "
                               f"({exc})") from None
        except BotoCoreError as exc:
            raise StorageError(f"{doing} failed on S3 {where}: {exc}") from None

    def check(self) -> None:
        try:
            with self._errors("checking the bucket"):
                self._client.head_bucket(Bucket=self.bucket)
        except ObjectNotFound:  # HEAD has no error body: a bare 404 is all there is to go on
            raise StorageError(f"{self.endpoint} answered 404 for bucket {self.bucket!r}: the "
                               "bucket does not exist, or the endpoint is not S3 (check "
                               "AWS_ENDPOINT_URL)") from None

    def put(self, key: str, data: bytes, *, content_type: str = "image/png",
            metadata: Mapping[str, str] | None = None) -> None:
        # A single PUT is atomic on S3; the SHA-256 lets the server refuse a corrupted body.
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        with self._errors(f"storing {key!r}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                    ContentType=content_type, Metadata=dict(metadata or {}),
                                    ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)

    def put_file(self, key: str, path: Path, *, content_type: str) -> None:
        with self._errors(f"uploading {key!r}"):
            self._client.upload_file(str(path), self.bucket, self._key(key),
                                     ExtraArgs={"ContentType": content_type},
                                     Config=self._transfer)

    def get(self, key: str) -> bytes:
        with self._errors(f"reading {key!r}"):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with self._errors(f"looking up {key!r}"):
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key!r}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root + _check_prefix(prefix))
        with self._errors(f"listing {prefix!r}"):
            for page in pages:
                for entry in page.get("Contents", []):
                    yield entry["Key"][len(root):]


def inside(dest: Storage, store: Storage) -> bool:
    """Whether writing to `dest` writes among `store`'s objects: the same folder or one
    under it, or the same bucket at or under its prefix (an empty prefix is the bucket)."""
    if isinstance(dest, LocalStorage) and isinstance(store, LocalStorage):
        return dest.root.resolve().is_relative_to(store.root.resolve())
    if isinstance(dest, S3Storage) and isinstance(store, S3Storage):
        same_bucket = (dest.bucket, dest.endpoint) == (store.bucket, store.endpoint)
        return same_bucket and (not store.prefix or dest.prefix == store.prefix
                                or dest.prefix.startswith(store.prefix + "/"))
    return False


def open_storage(url: str, *, endpoint_url: str | None = None, max_attempts: int = 5) -> Storage:
    """The backend for a storage URL: `s3://bucket[/prefix]`, `file:///path` or a folder path.

    `endpoint_url` overrides boto3's own chain (which already reads `AWS_ENDPOINT_URL`).
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URL {url!r} names no bucket (expected s3://bucket/prefix)")
        try:
            return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url,
                             max_attempts=max_attempts)
        except ValueError as exc:
            raise StorageError(f"storage URL {url!r}: {exc}") from None
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path))
    if len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise StorageError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or a folder")
    return LocalStorage(Path(url))


def configured_storage(settings: Settings) -> Storage:
    """The image store of the settings, retrying as they say (StorageError, one line, when it
    cannot be used): what commands, submit and workers all open."""
    return open_storage(settings.storage_url, max_attempts=settings.max_attempts)
