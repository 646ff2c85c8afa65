"""Native CPU kernels (`nnsae/csrc/*.cpp`), compiled on first use with the system C++ compiler and loaded with ctypes.

No build step and no torch headers: a kernel is plain C++ over raw pointers (a one-second compile), cached under
`$NNSAE_CACHE` (default `~/.cache/nnsae`) per source, compiler flags and CPU, since `-march=native` code must not
run on another CPU, and checked against its recorded size and sha256 before it is loaded (a damaged one is rebuilt).
Without a compiler (or with `NNSAE_NATIVE=0`) `library()` is None and callers use their plain torch path, which
computes the same results. Callers pass the loaded `Kernels` along as an argument, so SAE code
shipped by value to a remote server never references this module (ctypes, subprocess) and runs in pure torch there.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from nnsae.io.files import cache_dir
from nnsae.rundir import fsync_dir, safe_name, sha256_file, write_json

_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
_i64, _f32, _f64, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "nnsae_bf16_topk": [_i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _f64, _f64, _f64, _f64, _i64, _i64,
                        _f64, _int, _int, _ptr, _ptr, _ptr],
    "nnsae_bias_activation": [_i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    "nnsae_row_topk": [_i64, _i64, _i64, _ptr, _i64, _int, _ptr],
    "nnsae_feature_stats": [_i64, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _f32, _i64, _ptr, _i64, _i64, _i64,
                            _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr],
}
_STATS_TENSORS = ("firing_count", "activation_sum", "max_activation", "histogram", "top_values", "top_index",
                  "top_slot", "window_tokens", "window_acts")


def _ptr_of(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None and t.numel() else None


def _split_rows(run: Any, n: int, parts: int) -> None:
    """``run(lo, hi)`` over rows [0, n) in ``parts`` contiguous spans, one per thread (ctypes releases the GIL); the
    first error is re-raised in the caller's thread."""
    if parts <= 1:
        run(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    errors: list[BaseException] = []

    def guarded(lo: int, hi: int) -> None:
        try:
            run(lo, hi)
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=span) for span in zip(bounds[1:-1], bounds[2:])]
    for thread in threads:
        thread.start()
    guarded(bounds[0], bounds[1])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class Kernels:
    """The compiled kernels, called with torch tensors (CPU, contiguous, the dtypes each method names)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def bf16_topk(self, x: torch.Tensor, xa: torch.Tensor, key_b: torch.Tensor, wts: Any, b: torch.Tensor,
                  scale: torch.Tensor | None, k: int, g: int, margin: float, absolute: bool, relu: bool,
                  values: torch.Tensor, indices: torch.Tensor, ok: torch.Tensor) -> None:
        """`nnsae.kernels._bf16_block` for float32 x (n, d), each row's threshold `margin` error bounds below its
        k-th bf16 key: rows split over torch's thread count (ctypes releases the GIL, so the parts run in parallel)."""
        (n, d), s = x.shape, key_b.shape[1]

        def run(lo: int, hi: int) -> None:
            status = self.lib.nnsae_bf16_topk(
                hi - lo, d, s, xa.shape[1], key_b[lo].data_ptr(), xa[lo].data_ptr(), x[lo].data_ptr(),
                wts.W_t.data_ptr(), b.data_ptr(), _ptr_of(scale), wts.norm, wts.err_norm, wts.bf16_norm, wts.abs_max,
                k, g, margin, int(absolute), int(relu), values[lo].data_ptr(), indices[lo].data_ptr(), ok[lo].data_ptr())
            if status != 0:
                raise RuntimeError(f"nnsae_bf16_topk rejected its arguments (k={k}, g={g}, d_sae={s}).")

        _split_rows(run, n, min(torch.get_num_threads(), max(n // 64, 1)))

    def bias_activation(self, h: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, s: torch.Tensor | None,
                        b2: torch.Tensor | None, kind: int) -> None:
        """`nnsae.kernels.bias_activation` in place on float32 h (rows, d): one pass, rows split over torch's thread
        count once the work is worth starting threads for."""
        rows, d = h.shape
        ptrs = [None if x is None else x.data_ptr() for x in (b, t, s, b2)]

        def run(lo: int, hi: int) -> None:
            if hi > lo and self.lib.nnsae_bias_activation(hi - lo, d, h[lo].data_ptr(), *ptrs, kind) != 0:
                raise RuntimeError(f"nnsae_bias_activation: unknown kind {kind}.")

        _split_rows(run, rows, min(torch.get_num_threads(), max(1, rows * d >> 20)))

    def row_topk(self, h: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
        """`nnsae.kernels.row_topk` of float32 h (n, s) with unit column stride, by |h| if `absolute`: (n, k) int64
        indices, one pass over each row, rows split over torch's thread count."""
        n, s = h.shape
        indices = torch.empty(n, k, dtype=torch.int64)

        def run(lo: int, hi: int) -> None:
            if hi > lo and self.lib.nnsae_row_topk(hi - lo, s, h.stride(0), h[lo].data_ptr(), k, int(absolute),
                                                   indices[lo].data_ptr()) != 0:
                raise ValueError(f"row_topk: k={k} must be between 1 and the row length {s}.")

        _split_rows(run, n, min(torch.get_num_threads(), max(1, n * s >> 18)))
        return indices

    def feature_stats(self, state: dict[str, torch.Tensor], rows: torch.Tensor, feats: torch.Tensor,
                      vals: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor | None, first_index: int,
                      threshold: float, edges: torch.Tensor, n_top: int, window: int) -> None:
        """`nnsae.extract.FeatureStats.update` on `state` in place (entries grouped by ascending row)."""
        rows, feats = rows.to(torch.int64).contiguous(), feats.to(torch.int64).contiguous()
        vals, tokens = vals.to(torch.float32).contiguous(), tokens.to(torch.int64).contiguous()
        counted = counted.to(torch.bool).contiguous() if counted is not None else None
        edges = edges.to(torch.float64).contiguous()
        B, T = tokens.shape
        d_sae = state["firing_count"].numel()
        status = self.lib.nnsae_feature_stats(
            rows.numel(), _ptr_of(rows), _ptr_of(feats), _ptr_of(vals), B, T, _ptr_of(tokens), _ptr_of(counted),
            first_index, threshold, d_sae, _ptr_of(edges), edges.numel(), n_top, window,
            *(_ptr_of(state[key]) for key in _STATS_TENSORS))
        if status != 0:
            raise ValueError("FeatureStats.update: entries must be grouped by ascending row, inside the batch, with "
                             f"features below d_sae={d_sae}.")


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags.strip()}"


def _compile(compiler: str, record: Path) -> Path:
    """Build the library into a temp file, fsync it, move it to a name holding its own sha256 (so no file in the
    cache is ever rewritten), then write `record` (its name, size and sha256) atomically: a crash at any moment
    leaves either no record or a record of a complete, durable library."""
    record.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        errors = []
        for arch in (["-march=native"], []):  # some compilers (or CPUs) have no -march=native
            run = subprocess.run([compiler, *_FLAGS, *arch, *map(str, _SOURCES), "-o", tmp], capture_output=True,
                                 text=True)
            if run.returncode == 0:
                break
            errors.append(run.stderr.strip())
        else:
            raise RuntimeError("\n".join(errors))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest, size = sha256_file(Path(tmp)), os.path.getsize(tmp)
        library_path = record.parent / f"{record.stem}-{digest[:16]}.so"
        os.replace(tmp, library_path)  # concurrent first uses each build; equal names hold equal bytes
        fsync_dir(record.parent)
        write_json(record, {"file": library_path.name, "size": size, "sha256": digest})
        return library_path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cached(record: Path) -> Path | None:
    """The library `record` names if it is there whole (size and sha256 as recorded), else None (warning when a
    recorded library is damaged: it is rebuilt, never loaded, since mapping a truncated library kills the process
    with SIGBUS)."""
    try:
        entry = json.loads(record.read_text())
        library_path = record.parent / safe_name(entry["file"])
        if library_path.stat().st_size == entry["size"] and sha256_file(library_path) == entry["sha256"]:
            return library_path
    except FileNotFoundError:
        if not record.exists():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    warnings.warn(f"nnsae: the cached native kernels recorded in {record} are damaged (size or sha256 differ); "
                  "rebuilding them.", RuntimeWarning, stacklevel=4)
    return None


def _load() -> Kernels | None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None
    try:
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) + " ".join(_FLAGS).encode()
                                + compiler.encode() + _cpu_signature().encode()).hexdigest()[:16]
        record = cache_dir("native") / f"kernels-{digest}.json"
        lib = ctypes.CDLL(str(_cached(record) or _compile(compiler, record)))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"nnsae: native kernels unavailable ({error}); using the torch path (same results, slower). "
                      "Set NNSAE_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return Kernels(lib)


_lock = threading.Lock()
_loaded: dict[str, Kernels | None] = {}


def library() -> Kernels | None:
    """The compiled kernels, or None when they are switched off (`NNSAE_NATIVE=0`) or cannot be built (warns once)."""
    if os.environ.get("NNSAE_NATIVE", "1") == "0":
        return None
    with _lock:
        if "kernels" not in _loaded:
            _loaded["kernels"] = _load()
        return _loaded["kernels"]
