"""Where kolm's shared files live: a local folder, or a prefix in object storage (``s3://``,
``gs://``) through ``pyarrow.fs``.

A ``Store`` is one root and the few operations kolm needs over it, by key (a relative POSIX
path, ``artifacts/routing-1.0.kolm``): whole-file reads and writes (atomic: temp + rename in a
folder, one object appearing whole in object storage), **create-if-absent** (``put_if_absent``:
a hard link in a folder, fsynced with its folder before it returns; a conditional PUT
``If-None-Match: *`` on S3), listing by prefix, copying folders in and out, and the
``(storage_path, storage_filesystem)`` pair Ray Train's ``RunConfig`` takes. ``fetched`` gives
a local path for a file at a location of either kind.

Object stores take their endpoint and credentials from the standard variables of the node that
uses them (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for another S3 server such as MinIO,
``AWS_ACCESS_KEY_ID`` ... or the node's role); a ``Store`` pickles as its URI and reconnects
where it lands. URIs carry no settings: a query string is refused, so no secret rides in one.
``gs://`` has no create-if-absent here (the precondition it needs is not in ``pyarrow.fs``):
``can_create_if_absent`` is False and ``put_if_absent`` refuses, so artifacts can't go there.

Must not know what kolm stores in it (artifacts, cache entries, samples): callers name the keys.
What needs an exclusive lock, an atomic rename or private file modes (receipts, release state,
signing keys) stays on a POSIX folder: ``kolm_ray.home.state_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol
from urllib.parse import urlsplit

from kolm_ray.durable import fsync_dir
from kolm_ray.errors import InputError, KolmRuntimeError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

OBJECT_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs"}
_BUCKET = {"s3": re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
           "gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")}
_CHUNK = 1 << 20


class Store(Protocol):
    """One root, a folder or an object-storage prefix; every key is relative to it."""

    uri: str  # the folder's absolute path, or scheme://bucket[/prefix]
    can_create_if_absent: bool  # put_if_absent works here

    def url(self, key: str = "") -> str:
        """The location of ``key``: a path for a folder store, a URI for an object store."""
        ...

    def child(self, key: str) -> "Store":
        """The store rooted at ``key``."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """Raises: FileNotFoundError where there is no such file."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace ``key`` atomically: readers see the old bytes or the new ones, never part."""
        ...

    def put_if_absent(self, key: str, source: bytes | Path) -> bool:
        """Create ``key`` with ``source`` (bytes or a local file) only if it does not exist.
        True if this call created it; False if it existed (it is left untouched)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys of the files under ``prefix`` (relative to the root), sorted; none if it is absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing one is not an error."""
        ...

    def upload_file(self, local: Path, key: str) -> None:
        """Copy a local file to ``key`` (atomically, as ``write_bytes``)."""
        ...

    def download_file(self, key: str, dest: Path) -> Path:
        """Raises: FileNotFoundError where there is no such file."""
        ...

    def upload_dir(self, local: Path, key: str) -> None: ...

    def download_dir(self, key: str, dest: Path) -> Path: ...

    def train_storage(self, key: str = "") -> tuple[str, "pafs.FileSystem | None"]:
        """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` at ``key``."""
        ...

    def check(self) -> None:
        """Fail early on a store that can't be used. Raises: InputError (no such bucket),
        KolmRuntimeError (no credentials, access denied, unreachable)."""
        ...


# ----- locations ---------------------------------------------------------------------------------


def is_remote(location: str | os.PathLike) -> bool:
    """True for an object-storage URI (``s3://``, ``gs://``), False for a path or ``file://``."""
    text = os.fspath(location)
    return "://" in text and urlsplit(text).scheme.lower() in OBJECT_SCHEMES


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location`` with ``parts`` appended: a path stays a path, a URI gets ``/`` segments."""
    text = os.fspath(location)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(text).expanduser().joinpath(*parts))


def open_store(location: str | os.PathLike | Store) -> Store:
    """The store rooted at ``location``: a folder (a path or ``file://``) or ``s3://BUCKET/PREFIX``,
    ``gs://BUCKET/PREFIX``. Nothing is contacted until the first operation.

    Raises:
        InputError: an unsupported scheme, no bucket, a malformed bucket name, a query string,
            or a ``..`` segment.
    """
    if isinstance(location, (LocalStore, ObjectStore)):
        return location
    text = os.fspath(location).strip()
    if not text:
        raise InputError("empty store location: give a folder, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    if "://" not in text:
        return LocalStore(text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return LocalStore(parts.path)
    if scheme not in OBJECT_SCHEMES:
        raise InputError(f"unsupported store {text!r}: give a folder, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    if parts.query or parts.fragment:
        raise InputError(f"store URI {text!r} has a query string: settings and credentials come from the "
                         "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from the URI")
    scheme = OBJECT_SCHEMES[scheme]
    bucket = parts.netloc
    if not bucket:
        raise InputError(f"store URI {text!r} names no bucket: write {scheme}://BUCKET/PREFIX")
    if not _BUCKET[scheme].match(bucket) or ".." in bucket:
        raise InputError(f"store URI {text!r}: {bucket!r} is not a valid bucket name (lower-case letters, digits, "
                         "dots and dashes, 3-63 characters)")
    prefix = _clean_key(parts.path.strip("/"), text) if parts.path.strip("/") else ""
    return ObjectStore(scheme, bucket, prefix)


def parent_and_name(location: str | os.PathLike) -> tuple[Store, str]:
    """The store holding the file at ``location`` and the file's key in it.

    Raises:
        InputError: ``location`` is not a usable path or URI of a file.
    """
    text = os.fspath(location)
    if not is_remote(text):
        p = Path(text).expanduser()
        return LocalStore(str(p.parent)), p.name
    head, _, name = text.rstrip("/").rpartition("/")
    if not name or head.endswith(":/"):
        raise InputError(f"{text!r} names a bucket, not a file in it")
    return open_store(head), name


def location_of(location: str | os.PathLike) -> str:
    """A stable name for the file at ``location``: an absolute path, or the URI as given."""
    text = os.fspath(location)
    if is_remote(text):
        store, name = parent_and_name(text)
        return store.url(name)
    return str(Path(text).expanduser().resolve())


@contextlib.contextmanager
def fetched(location: str | os.PathLike) -> Iterator[Path]:
    """A local path of the file at ``location``: the path itself for a local file; for an object,
    a fresh download into a temporary folder, removed afterwards (no cache: what the caller reads
    is what the store holds now).

    Raises:
        InputError: there is no such object, or no such bucket.
    """
    text = os.fspath(location)
    if not is_remote(text):
        yield Path(text).expanduser()
        return
    store, name = parent_and_name(text)
    tmp = Path(tempfile.mkdtemp(prefix="kolm-fetch-"))
    try:
        try:
            local = store.download_file(name, tmp / name)
        except FileNotFoundError:
            store.check()  # a missing bucket reads as a missing object: say which
            raise InputError("not found", path=text) from None
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clean_key(key: str, where: str) -> str:
    """Raises: InputError for an absolute key, an empty segment or a ``..`` (no escaping the root)."""
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise InputError(f"invalid key {key!r}: relative, no empty, '.' or '..' segments", path=where)
    return key


# ----- a folder ----------------------------------------------------------------------------------


class LocalStore:
    """A folder (POSIX): atomic writes by temp file + rename, create-if-absent by hard link."""

    can_create_if_absent = True

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.fspath(root)).expanduser().absolute()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __reduce__(self):
        return (open_store, (self.uri,))

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key, self.uri) if key else self.root

    def url(self, key: str = "") -> str:
        return str(self._path(key))

    def child(self, key: str) -> "LocalStore":
        return LocalStore(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._replace(self._path(key), lambda f: f.write(data))

    def upload_file(self, local: Path, key: str) -> None:
        with self._errors(key), open(local, "rb") as src:
            self._replace(self._path(key), lambda f: shutil.copyfileobj(src, f, _CHUNK))

    def put_if_absent(self, key: str, source: bytes | Path) -> bool:
        # Durable when it returns True: the file's bytes, its name in its folder, and any folder
        # created for it are fsynced (an artifact or a version reservation is a record of truth).
        dest = self._path(key)
        with self._errors(key):
            _make_dirs(dest.parent)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    _write_source(f, source)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    # link(2) fails with EEXIST if dest exists, and dest appears whole: the
                    # complete file is in place before anyone can see its name.
                    os.link(tmp, dest)
                    fsync_dir(dest.parent)
                    return True
                except FileExistsError:
                    return False
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                # A filesystem without hard links: O_EXCL still never overwrites, but a reader
                # may see the file while it is being written.
                try:
                    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                try:
                    with os.fdopen(out, "wb") as f:
                        _write_source(f, source)
                        f.flush()
                        os.fsync(f.fileno())
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dest)  # ours (O_EXCL): no half file stays under the name
                    raise
                fsync_dir(dest.parent)
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        with self._errors(key):
            return self._path(key).stat().st_size

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        found = base.rglob("*") if recursive else base.iterdir()
        return sorted(p.relative_to(self.root).as_posix() for p in found if p.is_file())

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), self._errors(key):
            self._path(key).unlink()

    def download_file(self, key: str, dest: Path) -> Path:
        with self._errors(key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(key), dest)
        return dest

    def upload_dir(self, local: Path, key: str) -> None:
        with self._errors(key):
            shutil.copytree(local, self._path(key), dirs_exist_ok=True)

    def download_dir(self, key: str, dest: Path) -> Path:
        with self._errors(key):
            shutil.copytree(self._path(key), dest, dirs_exist_ok=True)
        return dest

    def train_storage(self, key: str = "") -> tuple[str, None]:
        path = self._path(key)
        with self._errors(key):
            path.mkdir(parents=True, exist_ok=True)
        return str(path.resolve()), None

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise InputError("store location is a file, not a folder", path=self.uri)

    @staticmethod
    def _replace(path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError as e:
            raise KolmRuntimeError(f"{self.url(key)}: {e.strerror or e}") from None


def _make_dirs(path: Path) -> None:
    """``mkdir -p path``, each folder it creates made durable in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        fsync_dir(folder.parent)


def _write_source(f, source: bytes | Path) -> None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        f.write(source)
    else:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, _CHUNK)


# ----- object storage ----------------------------------------------------------------------------


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


class ObjectStore:
    """A prefix in a bucket, through ``pyarrow.fs`` (S3 or GCS); on S3, create-if-absent is a
    conditional PUT through boto3, which ``pyarrow.fs`` cannot send."""

    def __init__(self, scheme: str, bucket: str, prefix: str = "") -> None:
        self.scheme, self.bucket, self.prefix = scheme, bucket, prefix
        self.uri = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
        self.can_create_if_absent = scheme == "s3"
        self._fs: pafs.FileSystem | None = None
        self._s3 = None

    def __repr__(self) -> str:
        return f"ObjectStore({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __reduce__(self):
        # The filesystem and the client hold this node's settings: rebuild them where it lands.
        return (open_store, (self.uri,))

    # -- paths

    def _key(self, key: str) -> str:
        """The object key inside the bucket."""
        key = _clean_key(key, self.uri) if key else ""
        return "/".join(p for p in (self.prefix, key) if p)

    def _fs_path(self, key: str) -> str:
        return "/".join(p for p in (self.bucket, self._key(key)) if p)

    def url(self, key: str = "") -> str:
        return f"{self.scheme}://{self._fs_path(key)}"

    def child(self, key: str) -> "ObjectStore":
        return ObjectStore(self.scheme, self.bucket, self._key(key))

    # -- connections

    def filesystem(self) -> "pafs.FileSystem":
        """This store's ``pyarrow.fs`` filesystem (built once, from this process's environment)."""
        if self._fs is None:
            import pyarrow.fs as pafs

            with self._errors(""):
                endpoint = _s3_endpoint() if self.scheme == "s3" else None
                if endpoint:
                    u = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
                    self._fs = pafs.S3FileSystem(endpoint_override=u.netloc, scheme=u.scheme,
                                                 region=_s3_region() or "us-east-1")
                else:  # from_uri finds the bucket's region
                    self._fs, _ = pafs.FileSystem.from_uri(f"{self.scheme}://{self.bucket}")
        return self._fs

    def _client(self):
        if self._s3 is None:
            import boto3

            self._s3 = boto3.session.Session().client("s3", endpoint_url=_s3_endpoint(), region_name=_s3_region())
        return self._s3

    # -- operations

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key), self.filesystem().open_input_stream(self._fs_path(key)) as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        # One object appears when the stream closes (a PUT, or a completed multipart upload):
        # readers never see part of it.
        with self._errors(key), self.filesystem().open_output_stream(self._fs_path(key)) as f:
            f.write(data)

    def upload_file(self, local: Path, key: str) -> None:
        with self._errors(key), open(local, "rb") as src, \
                self.filesystem().open_output_stream(self._fs_path(key)) as f:
            shutil.copyfileobj(src, f, _CHUNK)

    def put_if_absent(self, key: str, source: bytes | Path) -> bool:
        if self.scheme != "s3":
            raise InputError(f"create-if-absent is not supported on {self.scheme}:// stores (pyarrow.fs has no "
                             "precondition): put artifacts on s3:// or a folder", path=self.url(key))
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        client = self._client()
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(source), IfNoneMatch="*")
            else:
                # One PUT (up to 5 GB): S3 refuses it with 412 if the key exists, atomically.
                with open(source, "rb") as body:
                    client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the key exists. 409: another conditional write to it is in flight; either way
            # someone else holds it, and nothing was overwritten.
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            if code == "NoSuchBucket":
                raise InputError(f"bucket {self.bucket!r} does not exist", path=self.url(key)) from None
            raise KolmRuntimeError(f"{self.url(key)}: create-if-absent failed: {code or status}: "
                                   f"{e.response.get('Error', {}).get('Message', e)}") from None
        except NoCredentialsError:
            raise KolmRuntimeError(f"{self.url(key)}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the node a role)") from None
        except BotoCoreError as e:
            raise KolmRuntimeError(f"{self.url(key)}: {e}") from None

    def exists(self, key: str) -> bool:
        import pyarrow.fs as pafs

        with self._errors(key):
            return self.filesystem().get_file_info(self._fs_path(key)).type != pafs.FileType.NotFound

    def size(self, key: str) -> int:
        import pyarrow.fs as pafs

        with self._errors(key):
            info = self.filesystem().get_file_info(self._fs_path(key))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.url(key))
        return int(info.size)

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        import pyarrow.fs as pafs

        base = self._fs_path(prefix)
        root = self._fs_path("")
        try:
            # Not allow_not_found: that would also hide a missing bucket, which must be an error.
            with self._errors(prefix):
                infos = self.filesystem().get_file_info(pafs.FileSelector(base, recursive=recursive))
        except FileNotFoundError:
            return []
        return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), self._errors(key):
            self.filesystem().delete_file(self._fs_path(key))

    def download_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(key), self.filesystem().open_input_stream(self._fs_path(key)) as src, \
                open(dest, "wb") as f:
            shutil.copyfileobj(src, f, _CHUNK)
        return dest

    def upload_dir(self, local: Path, key: str) -> None:
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.upload_file(path, "/".join(p for p in (key, path.relative_to(local).as_posix()) if p))

    def download_dir(self, key: str, dest: Path) -> Path:
        for k in self.list(key):
            self.download_file(k, Path(dest) / (k[len(key) + 1:] if key else k))
        return Path(dest)

    def train_storage(self, key: str = "") -> tuple[str, "pafs.FileSystem"]:
        return self._fs_path(key), self.filesystem()

    def check(self) -> None:
        import pyarrow.fs as pafs

        with self._errors(""):
            info = self.filesystem().get_file_info(self.bucket)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"bucket {self.bucket!r} does not exist", path=self.uri)

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """pyarrow's OSErrors as kolm's errors, naming the URI; a missing object stays FileNotFoundError."""
        try:
            yield
        except FileNotFoundError:
            raise
        except (InputError, KolmRuntimeError):
            raise
        except OSError as e:
            text = str(e)
            if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
                raise InputError(f"bucket {self.bucket!r} does not exist", path=self.url(key)) from None
            hint = ""
            if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "credentials",
                                       "SignatureDoesNotMatch", "Forbidden")):
                hint = (" (check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
                        "node's role; for GCS, GOOGLE_APPLICATION_CREDENTIALS)")
            raise KolmRuntimeError(f"{self.url(key)}: {text}{hint}") from None
