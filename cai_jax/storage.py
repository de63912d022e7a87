"""One file-system layer for work directories: local paths and gs:// URLs.

Everything the pipeline and its stages read or write in a work directory goes
through these functions, so a run works the same on a local disk and on a
Cloud Storage bucket (a pod's hosts share nothing else). Local paths keep
plain `os` behaviour; gs:// URLs go through gcsfs (fsspec).

Atomic writes (`write_atomic`, `writing`): a reader sees the old content or
the new, never a part. Locally that is a temporary file in the same directory,
fsynced and renamed over the target. On Cloud Storage an upload is atomic
already (the object appears when it is complete), so the file is uploaded.

Cloud Storage has no rename, no append and no symlink: the pipeline's swap
copies, then deletes (its journal makes that safe to repeat after a kill),
`append` rewrites the object, and a stage's staging directory holds copies of
its inputs instead of links (pipeline.py).

Credentials: gcsfs and tensorstore (orbax's checkpoints) find Google's default
credentials (`gcloud auth application-default login`, a service account, a
TPU VM's metadata server). With `STORAGE_EMULATOR_HOST` set (a local GCS
emulator, as in the tests), both talk to it without credentials.
"""
from __future__ import annotations

import atexit
import builtins
import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator, Optional, Union

from cai_jax.errors import UserError

SCHEME = "gs://"
STAGING = ".staging"  # a work directory's room for stages still running (pipeline.py)


def is_remote(path: str) -> bool:
    return str(path).startswith(SCHEME)


def _check_scheme(path: str) -> None:
    if "://" in str(path) and not is_remote(path):
        raise UserError(f"{path}: only local paths and gs:// URLs are supported")


# ------------------------------------------------------------------ paths

def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def abspath(path: str) -> str:
    """A local path made absolute; a URL without its trailing slash."""
    _check_scheme(path)
    if is_remote(path):
        return SCHEME + posixpath.normpath(path[len(SCHEME):]).strip("/")
    return os.path.abspath(path)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def relpath(path: str, start: str) -> str:
    return posixpath.relpath(path, start) if is_remote(path) else os.path.relpath(path, start)


def outside_staging(path: str) -> str:
    """A path inside a staging directory (`<workdir>/.staging/<stage>/x`) as the
    work directory's own (`<workdir>/x`); any other path unchanged."""
    parts = path.split("/")
    for i in range(len(parts) - 2):
        if parts[i] == STAGING:
            return "/".join(parts[:i] + parts[i + 2:])
    return path


# ------------------------------------------------------------------ Cloud Storage access

_FS = None


def emulator() -> Optional[str]:
    """The GCS emulator's URL from STORAGE_EMULATOR_HOST (None when unset)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


def point_clients_at_emulator() -> None:
    """With an emulator: tensorstore (orbax's GCS driver) has its own settings
    for one, its endpoint and a placeholder token so that it asks for no
    credentials; and gcsfs's experimental class, which orbax's file layer
    (etils.epath through fsspec) gets, asks a gRPC service the emulator does not
    serve for each bucket's type (a minute's timeout), so it is turned off.
    Called when this module is imported, before anything imports gcsfs."""
    url = emulator()
    if url is not None:
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def _gcs():
    """The gcsfs file system (one per process)."""
    global _FS
    if _FS is None:
        # gcsfs's experimental class asks a gRPC service for each bucket's
        # type, which an emulator does not serve: use the plain JSON API one.
        try:
            from gcsfs.core import GCSFileSystem
        except ImportError:
            raise UserError("gs:// work directories need gcsfs: pip install gcsfs") from None

        url = emulator()
        options = {"token": "anon", "endpoint_url": url} if url else {}
        # No listings cache: another process (another run, another host) may
        # have written since we last looked.
        _FS = GCSFileSystem(use_listings_cache=False, skip_instance_cache=True, **options)
    return _FS


point_clients_at_emulator()


def _forget_client() -> None:
    global _FS
    _FS = None


# A forked child makes its own client: the parent's is bound to an event loop
# that runs in a thread the child does not have.
os.register_at_fork(after_in_child=_forget_client)


def _key(url: str) -> str:
    return url[len(SCHEME):].rstrip("/")


# ------------------------------------------------------------------ queries

def exists(path: str) -> bool:
    return _gcs().exists(_key(path)) if is_remote(path) else os.path.exists(path)


def lexists(path: str) -> bool:
    return exists(path) if is_remote(path) else os.path.lexists(path)


def isdir(path: str) -> bool:
    return _gcs().isdir(_key(path)) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _gcs().isfile(_key(path)) if is_remote(path) else os.path.isfile(path)


def islink(path: str) -> bool:
    return False if is_remote(path) else os.path.islink(path)


def listdir(path: str) -> list[str]:
    """The names in a directory; FileNotFoundError when there is none."""
    if not is_remote(path):
        return os.listdir(path)
    fs = _gcs()
    if not fs.isdir(_key(path)):
        raise FileNotFoundError(path)
    return [posixpath.basename(p.rstrip("/")) for p in fs.ls(_key(path), detail=False)
            if p.rstrip("/") != _key(path)]


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk (top down: the caller may prune the directory list) over either kind of path."""
    if not is_remote(path):
        yield from os.walk(path)
        return
    fs = _gcs()
    if not fs.isdir(_key(path)):
        return
    stack = [_key(path)]
    while stack:
        root = stack.pop()
        dirs, files = [], []
        for entry in fs.ls(root, detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry["name"].rstrip("/") == root or not name:
                continue
            (dirs if entry["type"] == "directory" else files).append(name)
        dirs.sort(), files.sort()
        yield SCHEME + root, dirs, files
        stack.extend(posixpath.join(root, d) for d in reversed(dirs))


# ------------------------------------------------------------------ reading and writing

def open(path: str, mode: str = "r", **kwargs) -> IO:  # noqa: A001 (the layer's own open)
    """A file object. On Cloud Storage a file opened for writing becomes its
    object when closed, whole (a killed writer leaves no object)."""
    if not is_remote(path):
        return builtins.open(path, mode, **kwargs)
    return _gcs().open(_key(path), mode, **kwargs)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def makedirs(path: str) -> None:
    """A directory and its parents (nothing to make on Cloud Storage, where
    directories are the prefixes of objects' names)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Writes `path` so that a reader sees the old content or the new, whole."""
    with writing(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def writing(path: str, mode: Optional[int] = None) -> Iterator[IO[bytes]]:
    """A binary file whose content becomes `path`, whole, when the block ends
    without an error; when it raises, `path` is as it was. Locally a temporary
    file beside `path`, fsynced and renamed over it, with the umask's mode (or
    `mode`); on Cloud Storage a local temporary file uploaded as one object
    (an upload is atomic: the object appears when it is complete)."""
    if is_remote(path):
        with tempfile.NamedTemporaryFile(prefix="cai_jax-upload-") as f:
            yield f
            f.flush()
            _gcs().put_file(f.name, _key(path))
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}-")
    try:
        # mkstemp makes it 0600; an artifact follows the umask
        os.fchmod(fd, mode if mode is not None else 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # left only when the block failed


@contextlib.contextmanager
def local_directory_built(directory: str, keep_existing: bool = False) -> Iterator[str]:
    """A new local directory, whole or not at all: the block fills the
    temporary directory it gets (beside `directory`), which is renamed into
    place when the block ends without an error and removed when it raises.
    What was at `directory` is replaced, unless `keep_existing`: then a
    directory already there (a concurrent writer's equal entry in a cache)
    wins. For work directories on Cloud Storage see model_dir.save_model_dir."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}-")
    try:
        yield tmp
        if not keep_existing and os.path.exists(directory):
            shutil.rmtree(directory)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (keep_existing and os.path.isdir(directory)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append(path: str, text: str) -> None:
    """Appends to a log, durably (flushed and fsynced). A Cloud Storage object
    cannot grow: it is rewritten whole with the new lines, so a reader sees it
    before or after the append, never torn."""
    if is_remote(path):
        old = read_bytes(path) if exists(path) else b""
        write_atomic(path, old + text.encode("utf-8"))
        return
    with builtins.open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def create_exclusive(path: str, data: bytes) -> bool:
    """Creates `path` holding `data` only if it does not exist, in one step (no
    reader sees it empty); False when it exists. On Cloud Storage: an upload
    with the precondition ifGenerationMatch=0. Locally: a hard link of a
    complete temporary file."""
    if is_remote(path):
        try:
            _gcs().pipe_file(_key(path), data, mode="create")
            return True
        except FileExistsError:
            return False
    tmp = f"{path}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    write_atomic(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def remove(path: str) -> None:
    """Deletes a file; FileNotFoundError when it is absent."""
    if is_remote(path):
        if not _gcs().isfile(_key(path)):
            raise FileNotFoundError(path)
        _gcs().rm_file(_key(path))
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Deletes a directory and all in it (on Cloud Storage, also a single
    object of that name); nothing when absent."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs = _gcs()
    keys = fs.find(_key(path))
    if keys:
        fs.rm(keys)


def copy_tree(src: str, dst: str) -> None:
    """Copies a file or a directory's files to `dst` (server-side on Cloud
    Storage), overwriting what is there; repeating it after a kill is safe."""
    if not is_remote(src):
        if os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
        return
    fs = _gcs()
    if fs.isfile(_key(src)):
        fs.copy(_key(src), _key(dst))
        return
    keys = fs.find(_key(src))
    if keys:  # in one call: gcsfs copies them concurrently
        fs.copy(keys, [_key(dst) + "/" + posixpath.relpath(key, _key(src)) for key in keys])


def upload_tree(local: str, url: str) -> None:
    """Copies a local directory's files to `url` (a local path or a gs:// URL)."""
    for root, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            with builtins.open(os.path.join(root, name), "rb") as f:
                data = f.read()
            if is_remote(url):
                _gcs().pipe_file(_key(url) + "/" + rel.replace(os.sep, "/"), data)
            else:
                write_atomic(os.path.join(url, rel), data)


def local_copy(path: str) -> str:
    """A local directory holding what `path` holds, for libraries that read
    only local files (tokenizers): `path` itself when local, else a download
    into a temporary directory that lasts as long as the process (a tokenizer
    keeps reading its folder: it copies its files when saved again)."""
    if not is_remote(path):
        return path
    tmp = tempfile.mkdtemp(prefix="cai_jax-gcs-")
    atexit.register(shutil.rmtree, tmp, True)
    fs = _gcs()
    for key in fs.find(_key(path)):
        target = os.path.join(tmp, posixpath.relpath(key, _key(path)))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(key, target)
    return tmp


# ------------------------------------------------------------------ checks and modes

def check_bucket(url: str) -> None:
    """One line naming the URL when its bucket cannot be reached or written
    (no such bucket, no credentials, no emulator at STORAGE_EMULATOR_HOST)."""
    bucket = _key(url).split("/")[0]
    if not bucket:
        raise UserError(f"--workdir {url} names no bucket; use gs://BUCKET/PATH")
    url_of_emulator = emulator()
    where = f" (the emulator at STORAGE_EMULATOR_HOST={url_of_emulator})" if url_of_emulator else ""
    if url_of_emulator:
        _probe(url_of_emulator, url, where)  # gcsfs would retry a dead endpoint for a minute
    fs = _gcs()
    quiet = logging.getLogger("gcsfs")
    level, quiet.level = quiet.level, logging.CRITICAL + 1  # its retries log whole tracebacks
    try:
        fs.ls(bucket, detail=False)  # cheap, and fails the way a write would
    except FileNotFoundError:
        raise UserError(f"cannot use the work directory {url}: bucket {bucket} does not exist{where}") from None
    except Exception as e:  # noqa: BLE001 (connection, credentials, permissions: all one line)
        raise UserError(f"cannot reach the work directory {url}{where}: {_one_line(e)}") from None
    finally:
        quiet.level = level


def _probe(endpoint: str, url: str, where: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=10).close()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot reach the work directory {url}{where}: {_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, and a
    thread creating a file meanwhile would get the wrong mode)."""
    try:
        with builtins.open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
