"""Atomic artifact writing and resumable JSONL files.

Every artifact is written atomically (storage.write_atomic: locally a
temporary file renamed into place, on Cloud Storage one upload), so a killed
process leaves either the old file or the new one. Long generation stages append one record per finished item to a `.partial`
JSONL file and rename it when complete; on restart they read the ids already
done and skip them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Iterable, Iterator, Optional

from cai_jax import storage
from cai_jax.errors import MalformedFileError, json_error_text

log = logging.getLogger(__name__)

# Beside every training checkpoint directory D lies D + CHECKSUMS_SUFFIX
# (training/checkpoint.py); the pipeline finds checkpoints by it.
CHECKSUMS_SUFFIX = ".checksums.json"


def write_text_atomic(path: str, text: str) -> None:
    storage.write_atomic(path, text)


def follow_umask(path: str) -> None:
    """Gives `path` and everything under it the modes a plain open or mkdir
    would have (temp files and directories are created private)."""
    if storage.is_remote(path):
        return  # objects have no modes
    mask = storage.umask()
    for root, dirs, files in os.walk(path) if os.path.isdir(path) else [(None, [], [path])]:
        if root is not None:
            os.chmod(root, 0o777 & ~mask)
        for name in files:
            full = os.path.join(root, name) if root is not None else name
            if not os.path.islink(full):
                executable = os.stat(full).st_mode & 0o100
                os.chmod(full, (0o777 if executable else 0o666) & ~mask)


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str, drop_torn_tail: bool = False) -> list[dict]:
    """Reads a JSONL artifact; a malformed line is an error naming file and line.

    `drop_torn_tail`: a malformed last line is dropped with a warning instead,
    for logs appended to while running (a writer killed mid-line leaves one).
    """
    with storage.open(path, "rb") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    out = []
    for i, (number, line) in enumerate(lines):
        try:
            out.append(json.loads(line.decode("utf-8").rstrip("\r\n")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if not (drop_torn_tail and i == len(lines) - 1):
                # A stage reads its inputs through links in its staging directory: name the real file.
                shown = os.path.realpath(path) if storage.islink(path) else path
                what = (f"not valid JSON ({json_error_text(e)})" if isinstance(e, json.JSONDecodeError)
                        else f"not UTF-8 text (byte {e.start + 1} of the line)")
                raise MalformedFileError(f"{shown} line {number}: {what}") from e
            log.warning("%s line %d: dropped a torn last line (a writer killed mid-line)", path, number)
    return out


class PartialJsonl:
    """Append-only record log for a stage that produces one record per item.

    Records go to `<path>.partial` as they finish (flushed and fsynced per batch);
    `finish()` renames it to `<path>`. A torn last line from a kill is dropped
    on reopen.
    """

    def __init__(self, path: str, key: str = "id"):
        self.path, self.partial, self.key = path, path + ".partial", key
        storage.makedirs(storage.dirname(storage.abspath(path)))
        self.records: list[dict] = []
        if storage.exists(self.partial):
            with storage.open(self.partial) as f:
                for line in f:
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # the line being written when the process died
            # Rewrite without the torn tail so appends start on a clean line.
            write_jsonl_atomic(self.partial, self.records)

    def done_keys(self) -> set:
        return {r[self.key] for r in self.records}

    def extend(self, records: Iterable[dict]) -> None:
        records = list(records)
        storage.append(self.partial, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.records.extend(records)

    def finish(self, order: Iterable | None = None) -> list[dict]:
        """Writes the final file (optionally in the given key order) atomically."""
        records = self.records
        if order is not None:
            by_key = {r[self.key]: r for r in records}
            records = [by_key[k] for k in order if k in by_key]
        write_jsonl_atomic(self.path, records)
        if storage.exists(self.partial):
            storage.remove(self.partial)
        return records


def fingerprint(obj: Any) -> str:
    """The one fingerprint of a JSON-able value (config sections, cache stamps,
    manifests): sha256 of its canonical JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str) -> str | None:
    """sha256 of a file's content (16 hex digits), None when absent."""
    if not storage.isfile(path):
        return None
    h = hashlib.sha256()
    with storage.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# A directory may carry a seal, SEAL_FILE in its top level: the fingerprint of
# what it holds, computed by whoever wrote it from the content that matters (a
# model's parameters as arrays, not orbax's files, whose names are random), and
# the checksum of every file in it as written. A sealed directory whose files
# still match the seal has the recorded fingerprint; one whose files changed
# (flipped bytes, a lost or added file) has another.
SEAL_FILE = "saved.json"


def read_seal(path: str) -> Optional[dict]:
    """The seal of directory `path` ({"fingerprint", "files"}), or None when it
    has none (or an older saved.json: a save id, no checksums)."""
    seal_path = storage.join(path, SEAL_FILE)
    if not storage.isfile(seal_path):
        return None
    try:
        with storage.open(seal_path) as f:
            seal = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None  # unreadable: the directory's files decide (and differ from a sealed one's)
    if not (isinstance(seal, dict) and isinstance(seal.get("fingerprint"), str)
            and isinstance(seal.get("files"), dict)):
        return None
    return seal


def _listing(path: str) -> tuple[dict[str, Optional[str]], dict[str, str]]:
    """The checksums of the files in directory `path` (relative paths; the seal
    file aside) and the fingerprints of the sealed directories below it, which
    stand for everything in them."""
    files, sealed = {}, {}
    for root, dirs, names in storage.walk(path):
        keep = []
        for d in sorted(dirs):
            full = storage.join(root, d)
            if not storage.islink(full) and read_seal(full) is not None:
                sealed[storage.relpath(full, path)] = _directory_fingerprint(full)
            else:
                keep.append(d)
        dirs[:] = keep
        for name in names:
            if root == path and name == SEAL_FILE:
                continue
            full = storage.join(root, name)
            files[storage.relpath(full, path)] = file_hash(full)
    return files, sealed


def seal_directory(path: str, volatile: dict[str, str]) -> str:
    """Seals directory `path` (see SEAL_FILE) and returns its fingerprint: the
    checksums of its files, except that each subdirectory named in `volatile`
    counts by the digest given for it (what it holds, however it was written),
    not by its files. The seal records every file's checksum all the same."""
    files, _ = _listing(path)
    kept = {rel: value for rel, value in files.items()
            if not any(rel.startswith(d.rstrip("/") + "/") for d in volatile)}
    value = fingerprint({"files": sorted(kept.items()), "volatile": volatile})
    write_json_atomic(storage.join(path, SEAL_FILE), {"fingerprint": value, "files": files})
    return value


def _directory_fingerprint(path: str) -> Optional[str]:
    files, sealed = _listing(path)
    seal = read_seal(path)
    if seal is not None and files == seal["files"]:
        own = seal["fingerprint"]  # intact: what its writer fingerprinted
    else:
        if seal is not None or storage.exists(storage.join(path, SEAL_FILE)):
            files[SEAL_FILE] = file_hash(storage.join(path, SEAL_FILE))  # damaged, or an older saved.json
        if not files and not sealed:
            return None
        # Every file with its relative path, so that a flipped byte shows.
        own = fingerprint(sorted(files.items())) if files else None
    return own if not sealed else fingerprint([own, sorted(sealed.items())])


def path_fingerprint(path: str) -> str | None:
    """A cheap version stamp of an artifact, for caches: a file's hash; for a
    sealed directory (a saved model), the fingerprint its seal records, unchecked;
    for another directory, the hash of its saved.json (older models: a fresh id
    per save). None when the file is absent or the directory holds none of these."""
    if storage.isdir(path):
        seal = read_seal(path)
        if seal is not None:
            return seal["fingerprint"]
        path = storage.join(path, SEAL_FILE)
    return file_hash(path)


def content_fingerprint(path: str) -> str | None:
    """The checksum of an artifact's content: a file's hash; for a directory (a
    model, a run's checkpoints) the hashes of every file in it with their
    relative paths, so a flipped byte in the weights shows, except that a sealed
    directory in it (a saved model) whose files match its seal counts by the
    fingerprint the seal records: the same weights saved twice, under orbax's
    random file names, give the same fingerprint. None when the file is absent
    or the directory holds no file."""
    if not storage.isdir(path):
        return file_hash(path)
    return _directory_fingerprint(path)


def iter_batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
