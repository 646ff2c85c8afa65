"""`test_prompt`: TransformerLens' ``utils.test_prompt`` report (rank, logit and probability of the answer, top
tokens), on any HF model, optionally with SAEs spliced in."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nnsae.architectures.base import SAE
from nnsae.attachment.helpers import run_with_saes

__all__ = ["test_prompt"]


def _token_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def test_prompt(model: Any, prompt: str, answer: str | Sequence[str], *, saes: SAE | Sequence[SAE] = (),
                tokenizer: Any = None, prepend_bos: bool | None = None, prepend_space_to_answer: bool = True,
                top_k: int = 10, print_details: bool = True, use_error_term: bool | None = None) -> dict[str, Any]:
    """Run ``prompt + answer`` and report, for each answer token, its rank, logit and probability and the ``top_k``
    tokens at that position, printed as TransformerLens' ``utils.test_prompt`` prints them; ``saes`` are spliced in
    for the run (SAELens' tutorial compares the report with and without them).

    ``tokenizer`` defaults to ``model.tokenizer`` (nnsight's LanguageModel/TransformersModel). ``prepend_bos``:
    None uses the tokenizer's own special tokens; True/False force a BOS. Returns the numbers as a dict
    (``prompt_tokens``, ``answer_tokens``, ``ranks``: [(token, rank)], ``answer_logits``, ``answer_probs``,
    ``top``: per answer token, [(token, logit, prob)]).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("test_prompt needs a tokenizer: pass tokenizer=, or use a model wrapper that has one.")
    if isinstance(prompt, str) and not prompt:
        raise ValueError("test_prompt: the prompt is empty.")
    answers = [answer] if isinstance(answer, str) else list(answer)
    if len(answers) != 1:
        raise ValueError("test_prompt takes one answer (a string); call it once per answer.")
    text = f" {answers[0]}" if prepend_space_to_answer and not answers[0].startswith(" ") else answers[0]
    prompt_ids = _token_ids(tokenizer, prompt, add_special_tokens=prepend_bos is None)
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None and prompt_ids[:1] != [bos]:
        prompt_ids = [bos, *prompt_ids]
    if not prompt_ids:
        raise ValueError(f"test_prompt: the prompt {prompt!r} has no tokens.")
    answer_ids = _token_ids(tokenizer, text, add_special_tokens=False)
    if not answer_ids:
        raise ValueError(f"test_prompt: the answer {answers[0]!r} has no tokens.")
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = run_with_saes(model, ids, saes=saes, use_error_term=use_error_term)[0].float()
    decode = lambda i: tokenizer.decode([int(i)])  # noqa: E731
    report: dict[str, Any] = {"prompt_tokens": [decode(i) for i in prompt_ids],
                              "answer_tokens": [decode(i) for i in answer_ids],
                              "ranks": [], "answer_logits": [], "answer_probs": [], "top": []}
    lines = [f"Tokenized prompt: {report['prompt_tokens']}", f"Tokenized answer: {report['answer_tokens']}"]
    for index, token in enumerate(answer_ids):
        position = len(prompt_ids) + index - 1
        row = logits[position]
        probs = row.softmax(-1)
        order = row.argsort(descending=True)
        rank = int((order == token).nonzero()[0, 0])
        report["ranks"].append((decode(token), rank))
        report["answer_logits"].append(float(row[token]))
        report["answer_probs"].append(float(probs[token]))
        report["top"].append([(decode(i), float(row[i]), float(probs[i])) for i in order[:top_k]])
        if print_details:
            lines.append("Performance on answer token:")
            lines.append(f"Rank: {rank: <8} Logit: {float(row[token]):5.2f} Prob: {float(probs[token]):6.2%} "
                         f"Token: |{decode(token)}|")
            lines += [f"Top {i}th token. Logit: {logit:5.2f} Prob: {prob:6.2%} Token: |{tok}|"
                      for i, (tok, logit, prob) in enumerate(report["top"][-1])]
    lines.append(f"Ranks of the answer tokens: {report['ranks']}")
    print("\n".join(lines))
    return report
