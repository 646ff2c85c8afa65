"""A stand-in for an NDIF worker: deserialize nnsight's real request payload and run it on a local tiny model.

Run as a fresh process by tests/test_remote.py:

    python tests/remote_server.py <jobs file> <results file>

The jobs file is a torch.save'd dict ``{name: {"blob": bytes, "family": str, "wrapper": str, "dtype": str}}``; the
results file gets ``{name: {...}}`` (plus ``"nnsae_importable"``).

It cannot import nnsae (the repository is taken off sys.path and an import blocker is installed ahead of the
editable-install finder), so everything nnsae-related must arrive by value in the payload. It builds its own copy
of the tiny model (tests/tiny_models.py, loaded by file path), wraps it like the client did, resolves the payload's
persistent ids against it (as a server does with `_remoteable_persistent_objects`), executes the trace and writes
every tensor the body bound (and any error) to the result file with torch.save.

Importing this module has no side effects. The client half (`CaptureBackend`, `run_server`) is shared by
tests/test_remote.py and tutorials/06_remote_ndif.ipynb.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

PAD, BOS, EOS = 0, 1, 2
HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def make_tokenizer(vocab_size: int = 128):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


# ---------------------------------------------------------------------------------------------------------------
# the client side
# ---------------------------------------------------------------------------------------------------------------


class CaptureBackend:
    """What RemoteBackend sends, without the HTTP: register local modules, then serialize the tracer
    (pass as ``model.trace(..., backend=CaptureBackend())``; the payload bytes end up in ``.blob``)."""

    def __init__(self) -> None:
        self.blob: bytes | None = None

    def __call__(self, tracer) -> None:
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel

        pull_env()
        self.blob = RequestModel.serialize(tracer)


def run_server(jobs: dict, timeout: float = 600) -> dict:
    """Run ``{name: {"blob", "family", "wrapper"[, "dtype"]}}`` in one fresh server process; its results dict."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        jobs_file, results_file = Path(tmp) / "jobs.pt", Path(tmp) / "results.pt"
        torch.save(jobs, jobs_file)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(jobs_file), str(results_file)],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if not results_file.exists():
            raise RuntimeError(f"server crashed:\n{proc.stdout}\n{proc.stderr}")
        return torch.load(results_file, weights_only=False)


# ---------------------------------------------------------------------------------------------------------------
# the server side
# ---------------------------------------------------------------------------------------------------------------


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nnsae" or name.startswith("nnsae.") or name == "tests" or name.startswith("tests."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the server has no nnsae)", name=name)
        return None


def _isolate() -> None:
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() not in (REPO, HERE)]
    sys.meta_path.insert(0, _Blocker())
    for name in list(sys.modules):
        if name == "nnsae" or name.startswith("nnsae."):
            del sys.modules[name]


def run_job(blob: bytes, family: str, wrapper: str, dtype: str, tiny) -> dict:
    import nnsight
    import torch
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import dec, inc

    out: dict = {}
    try:
        hf = tiny.tiny_model(family, dtype=getattr(torch, dtype))
        if wrapper == "nnsight":
            model = nnsight.NNsight(hf)
            persistent = {"Interleaver": model.interleaver}
            persistent.update({f"Module:{envoy.path}": envoy._module for envoy in model.modules()})
        else:
            model = TransformersModel(hf, tokenizer=make_tokenizer())
            persistent = model._remoteable_persistent_objects()
        tracer = RequestModel.deserialize(blob, persistent)
        inc()  # the trace scope Tracer.__exit__ opens around its backend (what `.save()` checks)
        try:
            tracer.execute(tracer.info.code)
        finally:
            dec()
        out["values"] = {k: v.detach() for k, v in tracer.info.frame.f_locals.items() if isinstance(v, torch.Tensor)}
        # anything a trace-scoped attach could have left on the server's model
        out["leftovers"] = [
            name for name, module in hf.named_modules()
            if ".sae" in f".{name}" or "_hf_hook" in module.__dict__ or "_nnsae_state" in module.__dict__
            or module._forward_hooks or module._forward_pre_hooks
        ] + [key for key in model.interleaver.__dict__ if key.startswith("_nnsae") or key == "cancel"]
    except BaseException as error:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(error).__name__}: {error}"
        out["traceback"] = traceback.format_exc()
    return out


def main(jobs_file: str, results_file: str) -> None:
    _isolate()
    import torch

    torch.set_num_threads(1)  # same reduction order as the client's tests, so results compare bit for bit
    results: dict = {}
    try:
        import nnsae  # noqa: F401
    except ModuleNotFoundError:
        results["nnsae_importable"] = False
    else:
        results["nnsae_importable"] = True
    spec = importlib.util.spec_from_file_location("server_tiny_models", HERE / "tiny_models.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    jobs = torch.load(jobs_file, weights_only=False)
    for name, job in jobs.items():
        results[name] = run_job(job["blob"], job["family"], job["wrapper"], job.get("dtype", "float32"), tiny)
    results["nnsae_imported"] = any(n == "nnsae" or n.startswith("nnsae.") for n in sys.modules)
    torch.save(results, results_file)


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    main(sys.argv[1], sys.argv[2])
