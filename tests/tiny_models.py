"""Tiny random-weight Hugging Face models of each supported family, built from configs (no download)."""

from __future__ import annotations

import torch
import transformers

D_MODEL = 64
N_LAYERS = 3
N_HEADS = 4
VOCAB = 128

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS)
_LLAMA_LIKE = dict(
    _COMMON, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_key_value_heads=2,
    max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_positions=128,
        bos_token_id=1, eos_token_id=2,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_COMMON, hidden_size=D_MODEL, intermediate_size=4 * D_MODEL, max_position_embeddings=128,
        use_parallel_residual=True, bos_token_id=1, eos_token_id=2,
    ),
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=D_MODEL // N_HEADS),
    "gemma": lambda: transformers.GemmaConfig(**_LLAMA_LIKE, head_dim=D_MODEL // N_HEADS),
    "gemma2": lambda: transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=D_MODEL // N_HEADS),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=D_MODEL // N_HEADS),
}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A tiny causal LM of `family` with random weights, in eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    # Random norms weights so that norm gains matter in the tests (HF initialises them to 1 or 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_tokens(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def tiny_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny models' vocabulary (BOS=1, EOS=2, PAD=0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars[: VOCAB - 4])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
