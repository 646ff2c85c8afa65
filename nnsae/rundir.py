"""Run directories: what every long job (extraction, training, the activation cache, evaluation) does with its output
folder, written once.

- Atomic files: `atomic_write` writes a temp file (`.tmp-{name}.*`) beside the target, fsyncs it, `os.replace`s it
  into place and fsyncs the directory: readers see the old file or the new one, never a partial one, even after a
  crash. Files get the mode `open()` would give (the umask), not mkstemp's 0600.
- One lock per directory (`locked`): `fcntl.flock` on `{dir}/.lock`, released by the OS when the process ends (even
  by SIGKILL), so a lock file left by a finished or killed run never blocks; a second job is refused with one line
  naming the directory and the process that holds it.
- Identity (`check_identity`): a directory records what produced it (settings + fingerprints of model, tokenizer,
  data); continuing it with anything else fails, listing the differing keys (old → new) and the fix.
- Ownership (`claim`, `safe_name`, `child_path`): a tool writes into a directory it created or one holding its own
  record, refuses any other non-empty directory unless told to overwrite, and builds every file name from a checked
  single path component, so no name read from a file or given by a user escapes the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

TMP_PREFIX = ".tmp-"  # every temp file a run writes starts with this, so a restart can recognise and delete strays
LOCK = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide saved SAEs from other users


# ---- atomic files -------------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (renames, new files) durable; a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write `path` through `write(tmp_path)` into a temp file beside it, fsync it, `os.replace` it into place and
    fsync the directory: after a crash at any moment `path` is the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # after writing: some writers (safetensors) replace the file they are given
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent))


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp)
        except SafetensorError as e:  # e.g. a full disk: an OSError naming the file, as every other write gives
            raise OSError(f"Cannot write {path}: {e}") from None

    atomic_write(path, write)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- the lock -----------------------------------------------------------------------------------------------------


class RunLocked(RuntimeError):
    """Another process holds the directory's lock."""


@contextlib.contextmanager
def locked(directory: Path, job: str) -> Iterator[None]:
    """Hold `{directory}/.lock` (created if needed; never deleted, so every contender locks the same file) for the
    duration of `job` (e.g. "an nnsae extraction", named to contenders); refuse at once if another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    directory = Path(directory)
    path = directory / LOCK
    while True:
        directory.mkdir(parents=True, exist_ok=True)  # in the loop: a winner's cleanup may have removed it
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError:  # a read-only directory or lock file: locking needs no write access
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise PermissionError(f"Cannot create the lock file {path} ({e.strerror}): {directory} is not "
                                      "writable.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{directory} is in use: {holder} holds {path}. Wait for it to finish or use another "
                            "output directory.") from None
        try:  # the file may have been replaced between open and flock: then lock the one that is there now
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message a contender gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{job} (pid {os.getpid()} on {socket.gethostname()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- identity -----------------------------------------------------------------------------------------------------


class IdentityMismatch(ValueError):
    """A directory holds the output of a run with other settings, model, tokenizer or data."""


def _show(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "…"  # a fingerprint
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:59] + "…"


def identity_diff(old: Any, new: Any, key: str = "") -> list[str]:
    """The leaves where `old` and `new` differ, as `key.path: old → new` (nested dicts compared key by key)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in old or k not in new:
                out.append(f"{sub} (only in the {'existing run' if k in old else 'new call'})")
            else:
                out += identity_diff(old[k], new[k], sub)
        return out
    return [] if old == new else [f"{key or 'identity'}: {_show(old)} → {_show(new)}"]


def check_identity(where: Path, recorded: Mapping[str, Any], current: Mapping[str, Any], what: str, fix: str) -> None:
    """Refuse to continue `where` (holding `what`, e.g. "an extraction") unless its recorded identity equals
    `current` (compared as JSON)."""
    differences = identity_diff(json.loads(json.dumps(recorded)), json.loads(json.dumps(current)))
    if differences:
        raise IdentityMismatch(f"{where} holds {what} with different settings:\n  " + "\n  ".join(differences)
                               + f"\n{fix}")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()


def tensors_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of names, shapes, dtypes and every byte of a state dict (an SAE's weights)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Parameter names, shapes, dtypes and the first/last 512 values of each: cheap, and different for any other
    checkpoint or dtype."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(_tensor_bytes(flat[:512]) + _tensor_bytes(flat[-512:]))
    return h.hexdigest()


_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 ÄÖÜ éàç 日本語 def f(x): return x**2\n\t"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """Class, size, special ids and the ids of a probe text: cheap, and different for another tokenizer (None
    without one: pre-tokenized data)."""
    if tokenizer is None:
        return None
    specials = [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "sep", "cls", "unk")]
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, len(tokenizer), specials, list(ids)]).encode()
                          ).hexdigest()


def _looks_like_path(dataset: str) -> bool:
    return (dataset.startswith(("/", "./", "../", "~")) or os.sep in dataset and Path(dataset).parent.exists()
            or dataset.endswith((".txt", ".json", ".jsonl", ".parquet")))


def dataset_identity(dataset: Any, split: str, text_column: str | None) -> dict[str, Any]:
    """What identifies a dataset argument (see `nnsae.data.iter_documents`): a local file or folder by its files'
    names and sizes, a list of texts or a token tensor by their sha256, a `datasets.Dataset` by its fingerprint, a hub
    dataset by name and split. Other iterables (generators, IterableDataset) have none: ``identifiable`` is False."""
    if isinstance(dataset, str):
        path = Path(dataset).expanduser()
        if dataset != "offline" and not path.exists() and _looks_like_path(dataset):
            raise FileNotFoundError(f"Dataset {dataset!r} does not exist: pass an existing .txt/.jsonl/.parquet "
                                    "file or folder, an HF dataset name, or 'offline'.")
        desc: dict[str, Any] = {"path": dataset, "split": split, "text_column": text_column}
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            desc["files"] = [[str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size] for p in files]
        return desc
    if isinstance(dataset, (list, tuple)):
        h = hashlib.sha256()
        for text in dataset:
            h.update(hashlib.sha256(str(text).encode()).digest())
        return {"path": None, "n_documents": len(dataset), "sha256": h.hexdigest(), "text_column": text_column}
    if isinstance(dataset, torch.Tensor):
        return {"path": None, "tensor": list(dataset.shape), "sha256": hashlib.sha256(
            _tensor_bytes(dataset.reshape(-1))).hexdigest()}
    if isinstance(dataset, dict) and split in dataset:  # a DatasetDict: the split that is read
        dataset = dataset[split]
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str):
        return {"path": None, "type": type(dataset).__name__, "fingerprint": fingerprint, "text_column": text_column}
    return {"path": None, "type": type(dataset).__name__, "text_column": text_column, "identifiable": False}


# ---- ownership and names ------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """`name` if it is one plain path component (no separator, not `.`/`..`, no leading dot, no NUL, not absolute),
    else ValueError: every file name that comes from a manifest, a config or a user goes through it."""
    if (not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0")
            or os.path.isabs(name) or len(name.encode()) > 255):
        raise ValueError(f"{name!r} cannot be used as a file name: it must be one path component without '/', '\\', "
                         "a leading '.' or NUL, at most 255 bytes.")
    return name


def child_path(directory: Path, *names: str) -> Path:
    """`directory / name / ...` with every name checked by `safe_name`: never a path outside `directory`."""
    return Path(directory).joinpath(*(safe_name(n) for n in names))


def unique_names(raw: Sequence[str | None], fallback: str = "sae") -> list[str]:
    """File names for labels (hook names, Neuronpedia ids): runs of characters outside `[A-Za-z0-9._-]` become `_`,
    leading/trailing `.`/`_` are dropped, `{fallback}_{i}` where nothing is left, made unique by appending `_2`,
    `_3`, ..."""
    names: list[str] = []
    for i, label in enumerate(raw):
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label or "")).strip("._") or f"{fallback}_{i}"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def claim(directory: Path, record: str, what: str, overwrite: bool = False) -> bool:
    """Check that a job may write into `directory`: it does not exist or is empty, or it holds the job's `record`
    file (a previous run of the same job), or `overwrite` is set. Returns whether `record` exists."""
    if (directory / record).is_file():
        return True
    found = sorted(p.name for p in directory.iterdir() if p.name != LOCK and not p.name.startswith(TMP_PREFIX)
                   ) if directory.is_dir() else []
    if found and not overwrite:
        raise ValueError(f"{directory} is not empty and holds no {record}: refusing to write {what} into it (found "
                         f"{found[:5]}). Use a new or empty directory, or overwrite=True to write into it anyway.")
    return False


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and fail now, not after the compute, if files cannot be written into it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"Cannot create the output directory {directory} ({e.strerror}).") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"The output directory {directory} is not writable: choose another one.")
