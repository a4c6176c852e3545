"""Token layouts: how (prompt, response) token ids become fixed-shape model rows.

The padded layout: one row per sequence, `prompt + response` then padding. `loss_mask` marks the
response tokens (the prompt is never scored) and `segment_ids` marks real tokens (1) against
padding (0); both come from lengths, never from comparing ids with a pad id, so a pad id equal
to EOS cannot hide a real EOS.
"""

import numpy as np


def truncate(prompt, response, *, max_length, max_prompt_length):
    """Keeps the end of the prompt (its last `max_prompt_length` tokens) and the start of the response."""
    prompt = list(prompt)[-max_prompt_length:] if max_prompt_length else []
    response = list(response)[:max(max_length - len(prompt), 0)]
    return prompt, response


def padded_row(prompt, response, *, max_length, max_prompt_length, pad_id=0):
    """One padded row {input_ids, loss_mask, segment_ids}, each [max_length]; and whether it was truncated."""
    kept_prompt, kept_response = truncate(prompt, response, max_length=max_length,
                                          max_prompt_length=max_prompt_length)
    truncated = len(kept_prompt) < len(prompt) or len(kept_response) < len(response)
    tokens = kept_prompt + kept_response
    input_ids = np.full(max_length, pad_id, np.int32)
    input_ids[:len(tokens)] = tokens
    loss_mask = np.zeros(max_length, np.int32)
    loss_mask[len(kept_prompt):len(tokens)] = 1
    segment_ids = np.zeros(max_length, np.int32)
    segment_ids[:len(tokens)] = 1
    return dict(input_ids=input_ids, loss_mask=loss_mask, segment_ids=segment_ids), truncated


def padded_rows(prompts, responses, *, max_length, max_prompt_length, pad_id=0):
    """Stacks rows {input_ids, loss_mask, segment_ids} [num_rows, max_length]; and a truncated flag per row."""
    rows, truncated = zip(*(padded_row(prompt, response, max_length=max_length,
                                       max_prompt_length=max_prompt_length, pad_id=pad_id)
                            for prompt, response in zip(prompts, responses)))
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}, np.array(truncated)


def padded_pairs(pairs, *, max_length, max_prompt_length, pad_id=0):
    """Arrays `chosen_*` and `rejected_*` [num_pairs, max_length]; and how many pairs were truncated."""
    prompts = [pair["prompt"] for pair in pairs]
    arrays, any_truncated = {}, np.zeros(len(pairs), bool)
    for side in ("chosen", "rejected"):
        rows, truncated = padded_rows(prompts, [pair[side] for pair in pairs], max_length=max_length,
                                      max_prompt_length=max_prompt_length, pad_id=pad_id)
        arrays.update({f"{side}_{key}": value for key, value in rows.items()})
        any_truncated |= truncated
    return arrays, int(any_truncated.sum())


def sft_rows(pairs, *, max_length, max_prompt_length, pad_id=0):
    """SFT on the chosen responses (the DPO paper's Preferred-FT): rows and how many were truncated."""
    rows, truncated = padded_rows([pair["prompt"] for pair in pairs], [pair["chosen"] for pair in pairs],
                                  max_length=max_length, max_prompt_length=max_prompt_length, pad_id=pad_id)
    return rows, int(truncated.sum())
