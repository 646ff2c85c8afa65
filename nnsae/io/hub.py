"""Downloading SAE files from the Hugging Face Hub, through `huggingface_hub` only.

Only the files one SAE needs are fetched (its format's `files()`), each with `hf_hub_download`, so the usual
cache (`cache_dir`, default `HF_HUB_CACHE`), `revision`, `force_download`, tokens, `HF_ENDPOINT` and
`HF_HUB_OFFLINE` all behave as they do for models. Errors name the repo, revision and file concerned.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub import errors as hf_errors

from nnsae.io.formats import FORMAT_NAMES, get_format


class HubError(OSError):
    """A Hub download failed; the message says which repo, revision and file, and why."""


class SAEFileNotFoundError(HubError, FileNotFoundError):
    """The repo (at that revision) has no such file."""


class RepoNotFoundError(HubError):
    """No such repo, or it is private/gated and no valid token was given."""


class RevisionNotFoundError(HubError):
    """The repo has no such branch, tag or commit."""


class OfflineCacheMissError(HubError, FileNotFoundError):
    """Offline mode is on (HF_HUB_OFFLINE) and the file is not in the local cache."""


def is_offline() -> bool:
    """Whether `huggingface_hub` is in offline mode (`HF_HUB_OFFLINE=1`), read at call time."""
    check = getattr(constants, "is_offline_mode", None)
    return bool(check()) if callable(check) else bool(constants.HF_HUB_OFFLINE)


def cache_location(cache_dir: str | Path | None = None) -> str:
    return str(cache_dir) if cache_dir is not None else str(constants.HF_HUB_CACHE)


def _where(repo_id: str, revision: str | None) -> str:
    return f"repo {repo_id!r} at revision {revision or constants.DEFAULT_REVISION!r}"


def download_file(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                  force_download: bool = False, token: str | bool | None = None) -> Path:
    """Local path of `filename` from `repo_id` (downloaded if needed), with errors naming repo, revision, file."""
    where = _where(repo_id, revision)
    if force_download and is_offline():
        raise OfflineCacheMissError(
            f"force_download=True needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE); cannot "
            f"re-download {filename!r} from {where}. Unset HF_HUB_OFFLINE or drop force_download."
        )
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, token=token))
    except hf_errors.GatedRepoError as e:
        raise RepoNotFoundError(
            f"Hugging Face repo {repo_id!r} is gated: accept its terms on the Hub and log in "
            f"(`hf auth login` or HF_TOKEN) to download {filename!r}. ({_first_line(e)})"
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise RepoNotFoundError(
            f"Hugging Face repo {repo_id!r} not found at {constants.ENDPOINT} (wanted {filename!r}). Check the repo "
            f"id; if the repo is private, log in (`hf auth login` or HF_TOKEN)."
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise RevisionNotFoundError(
            f"Revision {revision!r} not found in Hugging Face repo {repo_id!r} (wanted {filename!r})."
        ) from e
    except hf_errors.LocalEntryNotFoundError as e:  # before EntryNotFoundError, its parent class
        if is_offline():
            raise OfflineCacheMissError(
                f"Offline mode is on (HF_HUB_OFFLINE) and {filename!r} from {where} is not in the local cache "
                f"{cache_location(cache_dir)}. Download it once while online, or unset HF_HUB_OFFLINE."
            ) from e
        raise HubError(
            f"Could not reach the Hugging Face Hub ({constants.ENDPOINT}) for {filename!r} from {where}, and it "
            f"is not in the local cache {cache_location(cache_dir)}: {_first_line(e)}"
        ) from e
    except hf_errors.EntryNotFoundError as e:
        raise SAEFileNotFoundError(f"File {filename!r} not found in Hugging Face {where}.") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _snapshot_root(local: Path, filename: str) -> Path:
    root = local
    for _ in Path(filename).parts:
        root = root.parent
    return root


def download_files(repo_id: str, required: list[str], optional: list[str] = (), *, revision: str | None = None,
                   cache_dir: str | Path | None = None, force_download: bool = False,
                   token: str | bool | None = None) -> Path:
    """Fetch `required` (all must exist) and `optional` (missing ones are skipped); return the snapshot folder."""
    root: Path | None = None
    for filename in required:
        name = posixpath.normpath(filename)
        local = download_file(repo_id, name, revision=revision, cache_dir=cache_dir, force_download=force_download,
                              token=token)
        root = root or _snapshot_root(local, name)
    for filename in optional:
        name = posixpath.normpath(filename)
        try:
            local = download_file(repo_id, name, revision=revision, cache_dir=cache_dir,
                                  force_download=force_download, token=token)
        except (SAEFileNotFoundError, OfflineCacheMissError):
            continue
        root = root or _snapshot_root(local, name)
    if root is None:
        raise ValueError("download_files needs at least one file.")
    return root


def download_sae(repo_id: str, path_in_repo: str, *, format: str | None = None, revision: str | None = None,
                 cache_dir: str | Path | None = None, force_download: bool = False,
                 token: str | bool | None = None) -> tuple[Path, str]:
    """Download one SAE's files and return (its local folder, its format name).

    With `format=None` the layout is found by trying the formats' file sets, SAELens' first; only files that
    exist are downloaded (plus, at worst, the small config file of a format that turns out not to match).
    """
    path = path_in_repo.strip("/")
    candidates = [format] if format else list(FORMAT_NAMES)
    tried: list[str] = []
    offline_misses: list[str] = []
    for name in candidates:
        try:
            module = get_format(name)
        except ModuleNotFoundError as e:  # a format whose module is not available in this install
            if format or e.name != f"nnsae.io.formats.{name}":
                raise
            continue
        required, optional = module.files(path)
        try:
            root = download_files(repo_id, required, optional, revision=revision, cache_dir=cache_dir,
                                  force_download=force_download, token=token)
        except (SAEFileNotFoundError, OfflineCacheMissError) as e:
            if format:
                raise
            tried.append(f"{name} ({', '.join(required)})")
            if isinstance(e, OfflineCacheMissError):
                offline_misses.append(name)
            continue
        return (root / path if path else root), name
    if offline_misses and len(offline_misses) == len(candidates):
        raise OfflineCacheMissError(
            f"Offline mode is on (HF_HUB_OFFLINE) and no SAE under {path or '(repo root)'!r} from "
            f"{_where(repo_id, revision)} is in the local cache {cache_location(cache_dir)}. Download it once while "
            f"online, or unset HF_HUB_OFFLINE."
        )
    raise SAEFileNotFoundError(
        f"No SAE found under {path or '(repo root)'!r} in Hugging Face {_where(repo_id, revision)}: none of the "
        f"known layouts is complete there. Tried: {'; '.join(tried)}."
    )


__all__ = ["HubError", "OfflineCacheMissError", "RepoNotFoundError", "RevisionNotFoundError", "SAEFileNotFoundError",
           "cache_location", "download_file", "download_files", "download_sae", "is_offline"]
