"""The one way activations come out of a model: one nnsight trace per batch, every hook point saved, the forward
stopped right after the deepest one; and the shuffling store that training reads from.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import nnsight
import torch

from nnsae.config import parse_dtype
from nnsae.data import OFFLINE, Chunk, batched, iter_documents, pack, special_token_ids
from nnsae.hooks import HookPoint, get_module, is_tl_hook, resolve_hook
from nnsae.io.files import read_json, read_safetensors
from nnsae.rundir import (check_identity, dataset_identity, model_fingerprint, tokenizer_fingerprint, write_json,
                          write_safetensors)
from nnsae.seam import as_nnsight, unwrap_model


class _ProbeDone(Exception):
    pass


def execution_order(model: Any, points: Sequence[HookPoint]) -> tuple[list[int], list[int]]:
    """(indices of `points` in the order the forward reaches them, activation width of each point), found with
    one single-token forward and plain torch hooks."""
    hf = unwrap_model(model)
    events: list[tuple[str, str]] = []
    widths: dict[tuple[str, str], int] = {}
    handles = []

    wanted = {(p.module, p.io) for p in points}

    def record(key: tuple[str, str], value: Any) -> None:
        value = value[0] if isinstance(value, tuple) else value
        events.append(key)
        widths.setdefault(key, value.shape[-1])
        if wanted <= widths.keys():
            raise _ProbeDone  # no need to run the rest of the model

    for point in sorted({(p.module, p.io) for p in points}):
        module = get_module(hf, point[0])
        if point[1] == "input":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, key=point: record(key, args[0] if args else next(iter(kwargs.values()))),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, i, o, key=point: record(key, o)))
    device = next(hf.parameters()).device
    try:
        with torch.no_grad():
            hf(torch.zeros(1, 1, dtype=torch.long, device=device))
    except _ProbeDone:
        pass
    finally:
        for h in handles:
            h.remove()
    first_seen = {key: i for i, key in reversed(list(enumerate(events)))}
    missing = [p.module for p in points if (p.module, p.io) not in first_seen]
    if missing:
        raise ValueError(f"The forward pass never reached module(s) {missing}; they cannot be hook points.")
    order = sorted(range(len(points)), key=lambda i: first_seen[(points[i].module, points[i].io)])
    return order, [widths[(p.module, p.io)] for p in points]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_HEAP_ENV = "NNSAE_KEEP_FREED_HEAP"
_heap_kept = False


def _keep_freed_heap() -> bool:
    """With `NNSAE_KEEP_FREED_HEAP=1`, let glibc keep freed heap memory for reuse: blocks of up to 32 MiB come from the
    heap, whose top goes back to the OS only once more than 1 GiB of it is free. Returns whether that is in effect; a
    no-op off glibc.

    Why: with glibc's default (dynamic) thresholds, every nnsight trace faulted its tensors' memory back in page by
    page: on SmolLM2 (8 × 128 tokens) 5,000-20,000 pages per batch, each about 4 µs on a VM, where a loop of plain
    forwards settles at none.

    It cannot be scoped to nnsae's loops (fixing either threshold turns off glibc's dynamic adjustment of both for
    good), so inside someone else's process it is opt-in; nnsae's own processes (the `nnsae` CLI, `python -m
    nnsae.training`, the demo, the benchmarks) turn it on, since the process is theirs.
    """
    global _heap_kept
    value = os.environ.get(KEEP_FREED_HEAP_ENV, "0").strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
        raise ValueError(f"{KEEP_FREED_HEAP_ENV}={os.environ[KEEP_FREED_HEAP_ENV]!r} is not understood: use 1 (keep "
                         f"freed heap memory for reuse) or 0 (leave glibc's allocator settings alone, the default).")
    if _heap_kept or value in ("0", "false", "no", "off") or platform.libc_ver()[0] != "glibc":
        return _heap_kept
    libc = ctypes.CDLL(None)
    # Fixing either threshold turns off glibc's dynamic adjustment, so both are set.
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    _heap_kept = True
    logging.getLogger(__name__).info(
        "nnsae set glibc's M_MMAP_THRESHOLD to 32 MiB and M_TRIM_THRESHOLD to 1 GiB for this process (freed heap "
        "memory is kept for reuse), as %s=1 asks.",
        KEEP_FREED_HEAP_ENV)
    return True


class Harvester:
    """Activations at several hook points from ONE forward per batch, stopped after the deepest point. Creating one
    calls `_keep_freed_heap` (with `NNSAE_KEEP_FREED_HEAP=1`, glibc keeps freed heap memory)."""

    def __init__(self, model: Any, hooks: Sequence[str | HookPoint]):
        _keep_freed_heap()
        self.model = as_nnsight(model)
        self.points = [resolve_hook(self.model, h).read for h in hooks]
        self.order, self.widths = execution_order(self.model, self.points)

    @property
    def device(self) -> torch.device:
        return next(unwrap_model(self.model).parameters()).device

    def __call__(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """[batch, pos] token ids → one [batch, pos, width] activation per hook point (in the SAE's space)."""
        tokens = tokens.to(self.device)
        with torch.no_grad():
            acts = self._trace(tokens)
        return [self.points[i].to_sae(acts[j]) for j, i in sorted(enumerate(self.order), key=lambda t: t[1])]

    def _trace(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        model, points, order = self.model, self.points, self.order
        with model.trace(tokens) as tracer:
            acts = []
            for i in order:
                envoy = model.get(points[i].module)
                value = envoy.input if points[i].io == "input" else envoy.output
                acts.append(value[0] if isinstance(value, tuple) else value)
            acts = nnsight.save(acts)
            tracer.stop()
        return acts


@dataclass
class StoreState:
    chunks_consumed: int = 0
    harvest_batches: int = 0
    next_batch: int = 0
    batches_in_round: int = 0
    exhausted: bool = False


class ActivationStore:
    """Shuffled batches of activations for training: `{hook: (batch_size_tokens, d_in)}` per step.

    Tokens come from `dataset` (see `nnsae.data.iter_documents`), packed into `context_size` chunks; each
    harvest runs `store_batch_size_prompts` chunks through the model once for all hooks. A mixing buffer of
    `n_batches_in_buffer` training batches is shuffled, half of it served and half kept to mix with the next
    harvest (SAELens' scheme, in bounded memory). Special tokens (BOS/EOS/PAD) are left out when
    `exclude_special_tokens`. The position in the data, the buffer and the RNG form `state_dict()`, so a resumed
    run sees exactly the batches an uninterrupted one would. With `cache_dir`, every harvest batch is also written
    to disk (`ActivationCache`) and read back by later stores with the same settings instead of running the model.
    """

    def __init__(self, model: Any, hooks: Sequence[str], dataset: Any = OFFLINE, *,
                 tokenizer: Any = None, context_size: int = 128, batch_size_tokens: int = 4096,
                 store_batch_size_prompts: int = 8, n_batches_in_buffer: int = 16, prepend_bos: bool = True,
                 exclude_special_tokens: bool = True, dtype: str | torch.dtype = "float32",
                 device: str | torch.device | None = None, seed: int = 42, text_column: str | None = None,
                 split: str = "train", model_name: str | None = None, cache_dir: str | Path | None = None,
                 eval_dataset: Any = None):
        if not hooks:
            raise ValueError("ActivationStore needs at least one hook.")
        self.hooks = list(hooks)
        self.harvester = Harvester(model, self.hooks)
        hf = unwrap_model(self.harvester.model)
        # Pre-tokenized data needs no tokenizer; text data without one fails when packing, naming the fix.
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        max_positions = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", None)
        if max_positions is not None and context_size > max_positions:
            raise ValueError(f"context_size={context_size} is larger than the model's {max_positions} positions.")
        if batch_size_tokens < 1 or n_batches_in_buffer < 2:
            raise ValueError("batch_size_tokens must be ≥ 1 and n_batches_in_buffer ≥ 2.")
        self.dataset, self.text_column, self.split, self.eval_dataset = dataset, text_column, split, eval_dataset
        self.context_size, self.prepend_bos = context_size, prepend_bos
        self.batch_size_tokens, self.store_batch_size_prompts = batch_size_tokens, store_batch_size_prompts
        self.buffer_tokens = n_batches_in_buffer * batch_size_tokens
        self.exclude_special_tokens = exclude_special_tokens
        specials = special_token_ids(self.tokenizer if self.tokenizer is not None else hf.config)
        self.excluded_ids = torch.tensor(sorted(specials) if exclude_special_tokens else [], dtype=torch.long)
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device) if device is not None else self.harvester.device
        self.model_name = model_name or getattr(hf.config, "_name_or_path", None) or type(hf).__name__
        self.seed = seed
        self.rank, self.world_size = 0, 1
        self.state = StoreState()
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[torch.Tensor] | None = None
        self.order: torch.Tensor | None = None  # live buffer rows, in serving order
        self._chunks: Iterator[Chunk] | None = None
        self._identity: dict[str, Any] | None = None
        if cache_dir is not None and self.identity()["dataset"].get("identifiable") is False:
            raise ValueError(f"cache_dir needs data with an identity, and a {type(dataset).__name__} has none: pass a "
                             "dataset name, local files, a list of texts, a token tensor or a datasets.Dataset.")
        self.cache = ActivationCache(Path(cache_dir), self.identity()) if cache_dir is not None else None

    @classmethod
    def from_sae(cls, model: Any, sae: Any, dataset: Any = None, **kwargs: Any) -> ActivationStore:
        """A store for ``sae`` (SAELens' ``ActivationsStore.from_sae``): its hook, and from its metadata the context
        size, ``prepend_bos``, ``exclude_special_tokens`` and the dataset (``dataset_path``, else ``dataset``, else
        the offline corpus); keyword arguments override them."""
        metadata = sae.cfg.metadata
        hook = metadata.hook_name or metadata.hf_hook_name
        if hook is None:
            raise ValueError("ActivationStore.from_sae needs an SAE whose cfg.metadata has hook_name or hf_hook_name.")
        for key, name in (("context_size", "context_size"), ("prepend_bos", "prepend_bos"),
                          ("exclude_special_tokens", "exclude_special_tokens")):
            value = getattr(metadata, name, None)
            if value is not None and not isinstance(value, list):
                kwargs.setdefault(key, value)
        if dataset is None:
            dataset = getattr(metadata, "dataset_path", None) or OFFLINE
        return cls(model, [hook], dataset, **kwargs)

    def held_out_batches(self, n_batches: int, batch_size_prompts: int | None = None) -> list[torch.Tensor]:
        """Token batches for evaluations during training, from data training never reads: ``eval_dataset``, else the
        offline corpus' test split when training reads the offline corpus; empty when there is neither."""
        if self.eval_dataset is None and not (isinstance(self.dataset, str) and self.dataset == OFFLINE):
            return []
        data, split = (self.eval_dataset, "train") if self.eval_dataset is not None else (OFFLINE, "test")
        chunks = pack(iter_documents(data, split=split, text_column=self.text_column), self.tokenizer,
                      self.context_size, self.prepend_bos)
        size = batch_size_prompts or self.store_batch_size_prompts
        return [torch.stack([c.tokens for c in group])
                for group in itertools.islice(batched(chunks, size), n_batches)]

    def get_batch_tokens(self) -> torch.Tensor:
        """The next ``[store_batch_size_prompts, context_size]`` token batch of the data stream (SAELens'
        ``get_batch_tokens``); the tokens are consumed, as there."""
        chunks = self._next_chunks()
        if not chunks:
            raise StopIteration("The dataset is exhausted.")
        return torch.stack([c.tokens for c in chunks])

    # ---- what training needs to know --------------------------------------------------------------------------

    def d_in(self, hook: str) -> int:
        return self.harvester.widths[self.hooks.index(hook)]

    def metadata(self, hook: str) -> dict[str, Any]:
        point = self.harvester.points[self.hooks.index(hook)]
        # A module path as hook_name means that module's output to SAELens (HookedProxyLM, which it selects by
        # model_class_name="AutoModelForCausalLM"); inputs only have an hf_hook_name.
        tl_name = is_tl_hook(self.harvester.model, hook)
        proxy = {"model_class_name": "AutoModelForCausalLM"} if not tl_name and point.io == "output" else {}
        return {
            "model_name": self.model_name,
            "hook_name": hook if tl_name else point.module,
            "hf_hook_name": f"{point.module}.{point.io}",
            **proxy,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "dataset_path": self.dataset if isinstance(self.dataset, str) else None,
            "exclude_special_tokens": self.exclude_special_tokens,
        }

    def shard(self, rank: int, world_size: int) -> ActivationStore:
        """Make this store read only every `world_size`-th chunk, starting at `rank` (data-parallel runs)."""
        if self._chunks is not None:
            raise RuntimeError("shard() must be called before iterating the store.")
        self.rank, self.world_size = rank, world_size
        self.generator.manual_seed(self.seed + rank)
        return self

    # ---- token chunks → activations ----------------------------------------------------------------------------

    def chunks(self) -> Iterator[Chunk]:
        docs = iter_documents(self.dataset, split=self.split, text_column=self.text_column)
        return pack(docs, self.tokenizer, self.context_size, self.prepend_bos, skip_chunks=0,
                    shard=(self.rank, self.world_size))

    def _next_chunks(self) -> list[Chunk]:
        if self._chunks is None:
            self._chunks = itertools.islice(self.chunks(), self.state.chunks_consumed, None)
        batch = list(itertools.islice(self._chunks, self.store_batch_size_prompts))
        self.state.chunks_consumed += len(batch)
        return batch

    def harvest(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Flattened activations of the kept tokens of `chunks`, one [n_tokens, d_in] tensor per hook."""
        tokens = torch.stack([c.tokens for c in chunks])
        keep = ~torch.isin(tokens, self.excluded_ids).flatten()
        return [a.flatten(0, 1)[keep.to(a.device)].to(self.device, self.dtype) for a in self.harvester(tokens)]

    def identity(self) -> dict[str, Any]:
        """What determines the activations this store yields (fingerprints of the model's weights, the tokenizer and
        the data, and the settings): the key of its disk cache, and what a resumed training run must match."""
        if self._identity is None:
            self._identity = {
                "model_name": self.model_name, "model": model_fingerprint(unwrap_model(self.harvester.model)),
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "dataset": dataset_identity(self.dataset, self.split, self.text_column), "hooks": self.hooks,
                "hook_points": [f"{p.module}.{p.io}" for p in self.harvester.points],
                "context_size": self.context_size, "prepend_bos": self.prepend_bos,
                "exclude_special_tokens": self.exclude_special_tokens, "dtype": str(self.dtype),
                "store_batch_size_prompts": self.store_batch_size_prompts}
        return self._identity

    def _next_activations(self) -> list[torch.Tensor] | None:
        """The next harvest batch: read from the disk cache when it holds it, else from the model (and cached)."""
        index = self.state.harvest_batches
        if self.cache is not None:
            cached = self.cache.read(index, self.rank)
            if cached is not None:
                n_chunks, acts = cached
                self.state.chunks_consumed += n_chunks
                self.state.harvest_batches += 1
                self._chunks = None  # the chunk stream is re-opened past the cached part if it is ever needed
                return [a.to(self.device, self.dtype) for a in acts]
        chunks = self._next_chunks()
        if not chunks:
            if self.cache is not None:
                self.cache.finish(self.rank)
            return None
        acts = self.harvest(chunks)
        self.state.harvest_batches += 1
        if self.cache is not None:
            self.cache.write(index, self.rank, len(chunks), acts)
        return acts

    def _refill(self) -> None:
        # The buffer is allocated once, with room for one harvest batch past `buffer_tokens`, and never copied:
        # `order` lists its live rows in serving order. The rows served last round are dead slots that the next
        # harvests overwrite; the new order is a random permutation of [kept rows, new rows] — the rows, and the
        # order, of `cat(kept, new)[randperm]` without building that concatenation (peak memory ≈ one buffer).
        if self.buffer is None:
            capacity = self.buffer_tokens + self.store_batch_size_prompts * self.context_size
            self.buffer = [torch.zeros(capacity, width, dtype=self.dtype, device=self.device)
                           for width in self.harvester.widths]  # zeros: checkpoints hold no uninitialised bytes
            kept = torch.empty(0, dtype=torch.long, device=self.device)
        else:
            kept = self.order[self.state.batches_in_round * self.batch_size_tokens:]
        free = torch.ones(self.buffer[0].shape[0], dtype=torch.bool, device=self.device)
        free[kept] = False
        free = free.nonzero().squeeze(1)
        n_new = 0
        while kept.numel() + n_new < self.buffer_tokens:
            batch = self._next_activations()
            if batch is None:
                self.state.exhausted = True
                break
            slots = free[n_new:n_new + batch[0].shape[0]]
            for buf, acts in zip(self.buffer, batch):
                buf.index_copy_(0, slots, acts)
            n_new += slots.numel()
        live = torch.cat([kept, free[:n_new]])
        self.order = live[torch.randperm(live.numel(), generator=self.generator).to(self.device)]
        release_free_memory()
        # Serve half and keep half for mixing; once the data has run out, serve everything left.
        servable = live.numel() if self.state.exhausted else live.numel() // 2
        self.state.batches_in_round = servable // self.batch_size_tokens
        self.state.next_batch = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.buffer is None or self.state.next_batch >= self.state.batches_in_round:
                if self.state.exhausted:
                    return
                self._refill()
                if self.state.batches_in_round == 0:
                    return
            i, b = self.state.next_batch, self.batch_size_tokens
            self.state.next_batch += 1
            rows = self.order[i * b:(i + 1) * b]
            yield {hook: buf.index_select(0, rows) for hook, buf in zip(self.hooks, self.buffer)}

    # ---- resume ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here: data position, buffer, RNG (tensors and plain values)."""
        state: dict[str, Any] = dict(vars(self.state), rng=self.generator.get_state(), rank=self.rank,
                                     world_size=self.world_size)
        if self.buffer is not None:
            state["buffer"] = {hook: buf for hook, buf in zip(self.hooks, self.buffer)}
            state["order"] = self.order
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"Store state is for rank {state['rank']}/{state['world_size']}, this store is "
                             f"{self.rank}/{self.world_size}.")
        if state.get("buffer") is not None and "order" not in state:
            raise ValueError("This store state has a mixing buffer but no serving order: it was written by an older "
                             "nnsae store. Start the run again in a new output directory.")
        self.state = StoreState(**{k: state[k] for k in vars(StoreState())})
        self.generator.set_state(state["rng"])
        buffer = state.get("buffer")
        self.buffer = [buffer[h].to(self.device, self.dtype) for h in self.hooks] if buffer is not None else None
        self.order = state["order"].to(self.device) if buffer is not None else None
        self._chunks = None  # re-opened lazily at state.chunks_consumed


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere). Called once per refill of the
    mixing buffer: harvest batches of a few MB freed in arbitrary order otherwise stay in the heap as holes. (Not
    after every training step: each step's temporaries would then be faulted back in page by page, ~10% of a TopK
    step.)"""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


class ActivationCache:
    """Harvested activations on disk, so several training runs reuse one model pass: one safetensors shard per
    harvest batch (`{rank}-{index}.safetensors`, tensors named by hook position) and a `manifest.json` with the
    store identity that produced them (`ActivationStore.identity`). Shards are written atomically and the manifest
    after them, so a killed harvest resumes at its last complete shard; a cache of another identity is refused."""

    def __init__(self, root: Path, settings: dict[str, Any]):
        self.root = root
        self.manifest_path = root / "manifest.json"
        if self.manifest_path.exists():
            self.manifest = read_json(self.manifest_path)
            check_identity(root, self.manifest["settings"], settings, "an activation cache",
                           "Use another cache_dir, or delete this one.")
        else:
            self.manifest = {"format": "nnsae-activation-cache", "version": 1, "settings": settings, "shards": {},
                             "complete_ranks": []}

    def _name(self, index: int, rank: int) -> str:
        return f"{rank}-{index:06d}.safetensors"

    def read(self, index: int, rank: int) -> tuple[int, list[torch.Tensor]] | None:
        entry = self.manifest["shards"].get(self._name(index, rank))
        if entry is None:
            return None
        tensors = read_safetensors(self.root / self._name(index, rank))
        return entry["chunks"], [tensors[str(i)] for i in range(len(tensors))]

    def write(self, index: int, rank: int, n_chunks: int, acts: list[torch.Tensor]) -> None:
        name = self._name(index, rank)
        write_safetensors(self.root / name, {str(i): a.cpu() for i, a in enumerate(acts)})
        self.manifest["shards"][name] = {"chunks": n_chunks, "tokens": int(acts[0].shape[0])}
        write_json(self.manifest_path, self.manifest)

    def finish(self, rank: int) -> None:
        if rank not in self.manifest["complete_ranks"]:
            self.manifest["complete_ranks"].append(rank)
            write_json(self.manifest_path, self.manifest)
