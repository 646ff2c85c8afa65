"""Text in, fixed-length token chunks out: dataset loading, the offline corpus, tokenization and packing.

Packing follows SAELens: documents are tokenized without BOS and concatenated with a separator token between
them (BOS by default); the stream is cut into chunks of `context_size` tokens, each starting with BOS when
`prepend_bos`. Every chunk remembers which document and position each token came from, so extraction can point
back into the data.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import platform
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from nnsae.io.files import cache_dir
from nnsae.rundir import atomic_write

OFFLINE = "offline"
TEXT_COLUMNS = ("text", "problem", "content")
TOKEN_COLUMNS = ("tokens", "input_ids")


# ---- documents ----------------------------------------------------------------------------------------------------


def _python_source_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    roots += [Path(p) for p in dict.fromkeys((paths["purelib"], paths["platlib"])) if Path(p).is_dir()]
    return roots


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _source_files(root: Path) -> Iterator[Path]:
    """.py files below `root` in sorted order, without descending into tests or nested site-packages."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        yield from (Path(folder) / f for f in sorted(files) if f.endswith(".py"))


_STATEMENT_LISTS = ("body", "handlers", "orelse", "finalbody", "cases")


def _statement_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of `tree` that hold statements, in `ast.walk`'s (breadth-first) order. A docstring can only belong
    to a statement, and statements only sit in these lists, so expressions are never visited (7× faster)."""
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        yield node
        for field in _STATEMENT_LISTS:
            children = getattr(node, field, None)
            if isinstance(children, list):
                todo.extend(children)


def _parse_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in _statement_nodes(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


_MEMO_FORMAT = 1


def _docstrings(path: Path) -> list[str]:
    """The non-empty module/class/function docstrings of a source file, in `ast.walk` order. Memoized as JSON in
    `cache_dir("docstrings")` per path, size, modification time and Python version: parsing takes about 10 ms a
    file, which made reading the corpus a few percent of a SmolLM2 forward over the same tokens."""
    try:
        stat = path.stat()
    except OSError:
        return []
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{platform.python_version()}|{_MEMO_FORMAT}"
    memo = cache_dir("docstrings") / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
    try:
        docs = json.loads(memo.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return docs
    except (OSError, ValueError):
        pass
    docs = _parse_docstrings(path)
    try:
        atomic_write(memo, lambda tmp: Path(tmp).write_text(json.dumps(docs), encoding="utf-8"))
    except OSError:  # a read-only cache only costs speed
        pass
    return docs


def offline_corpus(split: str = "train", min_chars: int = 200) -> Iterator[str]:
    """English prose that needs no network: docstrings of the installed Python modules (the standard library
    first, then site-packages), read with `ast` so nothing is imported. One document per module/class/function
    docstring, in a fixed order, produced lazily (each file's docstrings are memoized on disk after its first parse).
    Every 20th document (by content hash) forms the "test" split."""
    if split not in ("train", "test", "validation"):
        raise ValueError(f"The offline corpus has splits 'train' and 'test', not {split!r}.")
    want_test = split != "train"
    for root in _python_source_roots():
        for path in _source_files(root):
            for doc in _docstrings(path):
                if len(doc) >= min_chars and (zlib.crc32(doc.encode()) % 20 == 0) == want_test:
                    yield doc


@dataclass(frozen=True)
class Document:
    """One row of a dataset: raw text, or token ids. ``chunk=True`` marks a pre-tokenized row, used as it is (its
    first ``context_size`` tokens form one chunk, as SAELens' ``is_dataset_tokenized``) instead of being packed."""

    text: str | None = None
    tokens: list[int] | None = None
    chunk: bool = False


DATA_FORMS = ("'offline', an HF hub dataset name, a local .txt/.jsonl/.parquet file or folder (or a "
              "datasets.save_to_disk folder), a list of strings, a datasets.Dataset/IterableDataset with a text "
              "column or a pre-tokenized 'input_ids'/'tokens' column, or a token tensor [n, context]")


def _rows_to_documents(rows: Iterable[dict[str, Any]], text_column: str | None, source: str) -> Iterator[Document]:
    column = text_column
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"Dataset {source} yields {type(row).__name__} rows, not dicts of columns.")
        if column is None:
            column = next((c for c in TOKEN_COLUMNS + TEXT_COLUMNS if c in row), None)
            if column is None:
                raise ValueError(f"Dataset {source} has no text column (looked for {TEXT_COLUMNS + TOKEN_COLUMNS}; "
                                 f"columns are {sorted(row)}). Pass text_column=...")
        if column not in row:
            raise ValueError(f"Dataset {source} has no column {column!r}; columns are {sorted(row)}.")
        value = row[column]
        if isinstance(value, str):
            yield Document(text=value)
        else:  # token ids (a list, array or tensor): a pre-tokenized row, used as it is
            yield Document(tokens=[int(t) for t in value], chunk=True)


def _local_rows(path: Path) -> Iterator[dict[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".txt":
            yield {"text": file.read_text(encoding="utf-8")}
        elif file.suffix in (".jsonl", ".json"):
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)
        elif file.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(file).iter_batches():
                yield from batch.to_pylist()


def _token_rows(rows: Iterable[Iterable[int]]) -> Iterator[Document]:
    for row in rows:
        yield Document(tokens=[int(t) for t in row], chunk=True)


def iter_documents(dataset: Any, split: str = "train", text_column: str | None = None,
                   streaming: bool = True) -> Iterator[Document]:
    """Documents of ``dataset``: 'offline', an HF hub dataset name (streamed), a local .txt/.jsonl/.parquet file or
    folder (or a ``datasets.save_to_disk`` folder), a list of strings, a ``datasets.Dataset``/``IterableDataset``
    (a text column, or a pre-tokenized ``input_ids``/``tokens`` column) or a token tensor ``[n, context]``. Text is
    packed later (`pack`); token rows are used as they are. Anything else raises a ValueError naming the forms."""
    yield from _documents(dataset, split, text_column, streaming)


def _documents(dataset: Any, split: str, text_column: str | None, streaming: bool) -> Iterator[Document]:
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or dataset.is_floating_point():
            raise ValueError(f"A token tensor must be integer ids shaped [n, context], got {dataset.dtype} "
                             f"{tuple(dataset.shape)}.")
        yield from _token_rows(dataset.tolist())
        return
    if isinstance(dataset, (str, os.PathLike)):
        yield from _named_documents(str(dataset), split, text_column, streaming)
        return
    if type(dataset).__module__.startswith("datasets."):
        if isinstance(dataset, dict):  # a DatasetDict / IterableDatasetDict
            if split not in dataset:
                raise ValueError(f"The DatasetDict has splits {sorted(dataset)}, not {split!r}; pass split=.")
            dataset = dataset[split]
        yield from _rows_to_documents(dataset, text_column, type(dataset).__name__)
        return
    if isinstance(dataset, dict):
        raise ValueError(f"Unsupported data: a dict (columns {sorted(dataset)[:5]}). Pass " + DATA_FORMS + ".")
    try:
        rows = iter(dataset)
    except TypeError:
        raise ValueError(f"Unsupported data: {type(dataset).__name__}. Pass {DATA_FORMS}.") from None
    for i, row in enumerate(rows):
        if isinstance(row, str):
            yield Document(text=row)
        elif isinstance(row, torch.Tensor) or (isinstance(row, (list, tuple)) and all(isinstance(t, int) for t in row)):
            yield Document(tokens=[int(t) for t in row], chunk=True)
        else:
            raise ValueError(f"Unsupported data: item {i} is a {type(row).__name__}, not a string or a list of token "
                             f"ids. Pass {DATA_FORMS}.")


def _named_documents(dataset: str, split: str, text_column: str | None, streaming: bool) -> Iterator[Document]:
    if dataset == OFFLINE:
        yield from (Document(text=t) for t in offline_corpus(split))
        return
    path = Path(dataset)
    if path.exists():
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            import datasets

            yield from _rows_to_documents(datasets.load_from_disk(str(path)), text_column, dataset)
        else:
            yield from _rows_to_documents(_local_rows(path), text_column, dataset)
        return
    import datasets

    try:
        rows = datasets.load_dataset(dataset, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types for a missing/unreachable dataset
        raise ValueError(f"Could not open dataset {dataset!r} (split {split!r}): {e}. Use 'offline' for the "
                         "built-in offline corpus, or a local .txt/.jsonl/.parquet path.") from None
    yield from _rows_to_documents(rows, text_column, dataset)


# ---- packing ------------------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """`context_size` tokens, with the document index and in-document position of each (-1 for BOS/separators)."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor


def special_token_ids(source: Any) -> set[int]:
    """The special token ids SAELens' ``exclude_special_tokens=True`` leaves out: BOS, EOS, PAD, SEP and
    decoder-start, read from a tokenizer, a model config or a generation config (list-valued ids included). The one
    definition of "special tokens" in nnsae (training data, evaluation, extraction statistics, attached SAEs)."""
    ids: set[int] = set()
    for name in ("bos", "eos", "pad", "sep", "decoder_start"):
        value = getattr(source, f"{name}_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def pack(documents: Iterable[Document], tokenizer: Any, context_size: int, prepend_bos: bool = True,
         separator: str | int | None = "bos", skip_chunks: int = 0, shard: tuple[int, int] = (0, 1)
         ) -> Iterator[Chunk]:
    """Tokenize and pack documents into chunks. `skip_chunks` resumes a stream; `shard=(rank, world)` keeps
    every world-th chunk, for data-parallel runs. A pre-tokenized row (``Document.chunk``) is one chunk as it is (its
    first `context_size` tokens; no BOS added, no separator), so `tokenizer` may be None for token data."""
    if context_size < (2 if prepend_bos else 1):
        raise ValueError(f"context_size={context_size} is too small.")
    rank, world = shard
    buf_tokens: list[int] = []
    buf_docs: list[int] = []
    buf_pos: list[int] = []
    index = 0

    def take(chunk: Callable[[], Chunk]) -> Iterator[Chunk]:
        nonlocal index
        if index >= skip_chunks and index % world == rank:
            yield chunk()
        index += 1

    for doc_id, doc in enumerate(documents):
        if doc.chunk:
            if len(doc.tokens) < context_size:
                raise ValueError(f"Pre-tokenized row {doc_id} has {len(doc.tokens)} tokens, fewer than "
                                 f"context_size={context_size}: pass a smaller context_size or longer rows.")
            row = torch.tensor(doc.tokens[:context_size])
            yield from take(lambda: Chunk(row, torch.full_like(row, doc_id), torch.arange(context_size)))
            continue
        if tokenizer is None:
            raise ValueError("Text data needs a tokenizer: pass tokenizer=, or pre-tokenized data (a token tensor "
                             "[n, context] or an 'input_ids'/'tokens' column).")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prepend_bos and bos is None:
            raise ValueError("prepend_bos needs a tokenizer with a BOS (or EOS) token.")
        sep = {"bos": bos, "eos": tokenizer.eos_token_id, None: None}.get(separator, separator)
        body = context_size - 1 if prepend_bos else context_size
        ids = doc.tokens if doc.tokens is not None else tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if sep is not None and doc_id > 0:
            buf_tokens.append(sep), buf_docs.append(-1), buf_pos.append(-1)
        buf_tokens += ids
        buf_docs += [doc_id] * len(ids)
        buf_pos += range(len(ids))
        while len(buf_tokens) >= body:
            head, pad = ([bos], [-1]) if prepend_bos else ([], [])
            yield from take(lambda: Chunk(torch.tensor(head + buf_tokens[:body]), torch.tensor(pad + buf_docs[:body]),
                                          torch.tensor(pad + buf_pos[:body])))
            del buf_tokens[:body], buf_docs[:body], buf_pos[:body]


def tokenize_and_concatenate(dataset: Any, tokenizer: Any, streaming: bool = False, max_length: int = 1024,
                             column_name: str = "text", add_bos_token: bool = True, num_proc: int | None = None,
                             set_format: bool = True) -> Any:
    """TransformerLens' ``utils.tokenize_and_concatenate``, row for row: each map batch of documents (1,000 rows)
    is tokenized without special tokens, joined with EOS, cut into rows of ``max_length`` (``max_length - 1`` plus
    BOS with ``add_bos_token``), the remainder dropped (a batch shorter than one row is padded: with the pad token,
    else EOS). Returns a ``datasets`` dataset with one ``tokens`` column (torch format with ``set_format``), which
    every nnsae entry point takes as pre-tokenized data. Unlike TransformerLens, the tokenizer is not modified."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_and_concatenate needs a tokenizer with an EOS token.")
    if add_bos_token and tokenizer.bos_token_id is None:
        raise ValueError("add_bos_token=True needs a tokenizer with a BOS token.")
    row_len = max_length - 1 if add_bos_token else max_length
    dataset = dataset.select_columns([column_name])

    def rows(batch: dict[str, list]) -> dict[str, Any]:
        texts = batch[column_name]
        if not texts:
            return {"tokens": []}
        stream: list[int] = []
        for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
            stream += ([tokenizer.eos_token_id] if i else []) + list(ids)
        if len(stream) < row_len:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            out = [stream + [pad] * (row_len - len(stream))]
        else:
            out = [stream[i * row_len:(i + 1) * row_len] for i in range(len(stream) // row_len)]
        if add_bos_token:
            out = [[tokenizer.bos_token_id, *row] for row in out]
        return {"tokens": out}

    mapped = dataset.map(rows, batched=True, remove_columns=[column_name],
                         **({} if streaming else {"num_proc": num_proc}))
    if set_format:
        mapped.set_format(type="torch", columns=["tokens"])
    return mapped


def batched(chunks: Iterable[Chunk], batch_size: int) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
