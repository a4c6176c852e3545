"""Token layouts: how (prompt, response) token ids become fixed-shape model rows.

Masks and scored positions always come from lengths, never from comparing ids with a pad id, so a
pad id equal to EOS cannot hide a real EOS. Token t of a row is always predicted by token t - 1 of
the same row, so one shifted log-prob extraction (`dpo_jax.steps`) serves every layout.

`padded` (DPO: `chosen_*` and `rejected_*` arrays [pairs, max_length]; SFT: [sequences, max_length]):
    one row per sequence, prompt + response then padding. `loss_mask` marks the response tokens,
    `segment_ids` real tokens (1) against padding (0).
`packed` (arrays [rows, row_length]): whole pairs (or SFT sequences) packed into rows, at most
    `max_pairs_per_row` pairs per row, in as few rows as best-fit or worst-fit decreasing finds
    (`pack`). Each sequence is its own attention segment (`segment_ids` 1, 2, ...; 0 is padding) with
    positions restarting at 0.
`prefix_shared`: one row per pair holding prompt | chosen | rejected, the prompt encoded once;
    `branch_ids` say which part a token is in, and a token attends to its own branch and to the
    shared prompt (branch 0) only, so the rejected response never sees the chosen one. Both
    responses' positions start where the prompt ends. So that the first token of each response is
    predicted by the token right before it, the prompt's last token opens each branch (it is
    encoded twice, with the same position and the same context: the cost is one token per pair).
`packed_prefix_shared`: prefix-shared pairs, packed.

DPO rows of the packed layouts carry `sequence_ids` [rows, row_length]: 2k for a token of the k-th
pair's chosen response in that row, 2k + 1 for its rejected response, -1 for tokens not scored; and
`pair_mask` [rows, max_pairs_per_row]: which of the row's pair slots hold a pair.
"""

import bisect
import heapq

import numpy as np

LAYOUTS = ("padded", "packed", "prefix_shared", "packed_prefix_shared")
PROMPT_BRANCH, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2


def truncate(prompt, response, *, max_length, max_prompt_length, keep_prefix=0):
    """Keeps the end of the prompt (its last `max_prompt_length` tokens) and the start of the response.

    keep_prefix: leading prompt tokens always kept (a BOS), the rest of the budget going to its end.
    """
    prompt = list(prompt)
    if len(prompt) > max_prompt_length:
        keep_prefix = min(keep_prefix, max_prompt_length)
        prompt = prompt[:keep_prefix] + (prompt[-(max_prompt_length - keep_prefix):]
                                         if max_prompt_length > keep_prefix else [])
    response = list(response)[:max(max_length - len(prompt), 0)]
    return prompt, response


def truncate_example(prompt, responses, *, max_length, max_prompt_length, keep_prefix=0):
    """(prompt, responses, truncated) with every response truncated against the same kept prompt."""
    kept = [truncate(prompt, response, max_length=max_length, max_prompt_length=max_prompt_length,
                     keep_prefix=keep_prefix) for response in responses]
    kept_prompt = kept[0][0]
    kept_responses = [response for _, response in kept]
    truncated = len(kept_prompt) < len(prompt) or any(
        len(kept_response) < len(response) for kept_response, response in zip(kept_responses, responses))
    return kept_prompt, kept_responses, truncated


# ---------------------------------------------------------------------------------------------
# Padded
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Packed and prefix-shared
# ---------------------------------------------------------------------------------------------

class ItemTooLongError(ValueError):
    """An item to pack is longer than a row."""


def pack(sizes, *, capacity, max_items):
    """Lists of item indices, each list's sizes summing to <= capacity and <= max_items long: the
    fewer lists of best-fit decreasing and of worst-fit decreasing into as few rows as it fits.

    Best-fit decreasing fills rows one after another, each item, largest first, in the fullest row
    it fits. Its weakness is the item limit: the small items end up together, in rows full by count
    long before they are full of tokens. Worst-fit decreasing into a fixed number of rows places
    each item in the row with the most room left (and a free slot): the large items spread over the
    rows and the small ones fill the gaps they leave. Its number of rows is bisected between the
    lower bound (by tokens and by count) and best-fit's. When the limit does not bind, best-fit
    packs tighter, hence the choice of the two (docs/data.md has the padding of each on HH).
    Deterministic (ties keep index order); the lists come in order of their first (largest) item.
    """
    if not len(sizes):
        return []
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    if sizes[order[0]] > capacity:
        raise ItemTooLongError(f"item {order[0]} takes {sizes[order[0]]} tokens, more than a row of {capacity}")
    best_fit = _best_fit_decreasing(sizes, order, capacity, max_items)
    worst_fit = lambda num_rows: _worst_fit_decreasing(sizes, order, capacity, max_items, num_rows)
    infeasible = max(-(-len(sizes) // max_items), -(-sum(sizes) // capacity)) - 1  # fewer rows never fit
    feasible, bins = len(best_fit), best_fit
    if feasible - infeasible > 1 and (candidate := worst_fit(feasible - 1)) is not None:
        feasible, bins = feasible - 1, candidate
        while feasible - infeasible > 1:
            middle = (feasible + infeasible) // 2
            if (candidate := worst_fit(middle)) is None:
                infeasible = middle
            else:
                feasible, bins = middle, candidate
    return bins


def _best_fit_decreasing(sizes, order, capacity, max_items):
    """Lists of item indices, items placed in `order` each in the fullest row it fits (and with a
    free slot), a new row opened when none has room."""
    rows, open_rows = [], []  # open_rows: sorted (room left, row) of the rows with a free slot
    for index in order:
        size = sizes[index]
        slot = bisect.bisect_left(open_rows, (size, -1))
        if slot < len(open_rows):
            room, row = open_rows.pop(slot)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if len(rows[row]) < max_items and room - size > 0:
            bisect.insort(open_rows, (room - size, row))
    return rows


def _worst_fit_decreasing(sizes, order, capacity, max_items, num_rows):
    """`num_rows` lists of item indices, items placed in `order` each in the row with the most room
    left (and a free slot); None when an item fits in no row."""
    rows = [[] for _ in range(num_rows)]
    open_rows = [(-capacity, row) for row in range(num_rows)]  # heap of (-room left, row)
    for index in order:
        if not open_rows or -open_rows[0][0] < sizes[index]:
            return None
        negative_room, row = heapq.heappop(open_rows)
        rows[row].append(index)
        room = -negative_room - sizes[index]
        if len(rows[row]) < max_items and room > 0:
            heapq.heappush(open_rows, (-room, row))
    return rows


def _pair_parts(prompt, chosen, rejected, share_prompt):
    """[(tokens, positions, segment offset, branch, scored-sequence offset or None)] of one pair."""
    if share_prompt:
        n = len(prompt)
        opener = prompt[-1:]
        return [(prompt[:-1], np.arange(n - 1), 0, PROMPT_BRANCH, None),
                (opener + chosen, np.arange(n - 1, n + len(chosen)), 0, CHOSEN_BRANCH, 0),
                (opener + rejected, np.arange(n - 1, n + len(rejected)), 0, REJECTED_BRANCH, 1)]
    return [(prompt + chosen, np.arange(len(prompt) + len(chosen)), 0, None, 0),
            (prompt + rejected, np.arange(len(prompt) + len(rejected)), 1, None, 1)]


def pair_size(prompt, chosen, rejected, share_prompt):
    """Tokens a pair takes in a row."""
    if share_prompt:
        return len(prompt) + 1 + len(chosen) + len(rejected)
    return 2 * len(prompt) + len(chosen) + len(rejected)


def packed_pairs(pairs, *, row_length, max_pairs_per_row, share_prompt, pad_id=0):
    """DPO rows of the packed layouts (pairs already truncated): {input_ids, positions, segment_ids,
    sequence_ids, pair_mask[, branch_ids]}; the pairs' order in the rows is `pack`'s."""
    sizes = [pair_size(p["prompt"], p["chosen"], p["rejected"], share_prompt) for p in pairs]
    bins = pack(sizes, capacity=row_length, max_items=max_pairs_per_row)
    num_rows = len(bins)
    arrays = dict(input_ids=np.full((num_rows, row_length), pad_id, np.int32),
                  positions=np.zeros((num_rows, row_length), np.int32),
                  segment_ids=np.zeros((num_rows, row_length), np.int32),
                  sequence_ids=np.full((num_rows, row_length), -1, np.int32),
                  pair_mask=np.zeros((num_rows, max_pairs_per_row), bool))
    if share_prompt:
        arrays["branch_ids"] = np.zeros((num_rows, row_length), np.int32)
    for row, members in enumerate(bins):
        cursor = 0
        for slot, index in enumerate(members):
            pair = pairs[index]
            # Segments: one per pair when the prompt is shared, else one per sequence.
            segment_base = 1 + slot * (1 if share_prompt else 2)
            for tokens, positions, segment_offset, branch, side in _pair_parts(
                    pair["prompt"], pair["chosen"], pair["rejected"], share_prompt):
                span = slice(cursor, cursor + len(tokens))
                arrays["input_ids"][row, span] = tokens
                arrays["positions"][row, span] = positions
                arrays["segment_ids"][row, span] = segment_base + segment_offset
                if share_prompt:
                    arrays["branch_ids"][row, span] = branch
                if side is not None:
                    response_length = len(pair["chosen"] if side == 0 else pair["rejected"])
                    arrays["sequence_ids"][row, span.stop - response_length:span.stop] = 2 * slot + side
                cursor = span.stop
            arrays["pair_mask"][row, slot] = True
    return arrays


def packed_sequences(prompts, responses, *, row_length, max_sequences_per_row, pad_id=0):
    """SFT rows of the packed layouts (sequences already truncated): {input_ids, positions, segment_ids, loss_mask}."""
    sizes = [len(prompt) + len(response) for prompt, response in zip(prompts, responses)]
    bins = pack(sizes, capacity=row_length, max_items=max_sequences_per_row)
    shape = (len(bins), row_length)
    arrays = dict(input_ids=np.full(shape, pad_id, np.int32), positions=np.zeros(shape, np.int32),
                  segment_ids=np.zeros(shape, np.int32), loss_mask=np.zeros(shape, np.int32))
    for row, members in enumerate(bins):
        cursor = 0
        for slot, index in enumerate(members):
            tokens = list(prompts[index]) + list(responses[index])
            span = slice(cursor, cursor + len(tokens))
            arrays["input_ids"][row, span] = tokens
            arrays["positions"][row, span] = np.arange(len(tokens))
            arrays["segment_ids"][row, span] = slot + 1
            arrays["loss_mask"][row, cursor + len(prompts[index]):span.stop] = 1
            cursor = span.stop
    return arrays


def pair_arrays(pairs, layout, *, max_length, row_length, max_pairs_per_row, pad_id=0):
    """DPO arrays of (already truncated) pairs {prompt, chosen, rejected} in `layout`."""
    if layout == "padded":
        arrays, _ = padded_pairs(pairs, max_length=max_length, max_prompt_length=max_length, pad_id=pad_id)
        return arrays
    return packed_pairs(pairs, row_length=row_length, share_prompt=layout.endswith("prefix_shared"),
                        max_pairs_per_row=1 if layout == "prefix_shared" else max_pairs_per_row, pad_id=pad_id)


def sft_arrays(prompts, responses, layout, *, max_length, row_length, max_pairs_per_row, pad_id=0):
    """SFT arrays of (already truncated) sequences: padded rows, else packed ones (SFT has no prompt to share)."""
    if layout == "padded":
        rows, _ = padded_rows(prompts, responses, max_length=max_length, max_prompt_length=max_length, pad_id=pad_id)
        return rows
    return packed_sequences(prompts, responses, row_length=row_length,
                            max_sequences_per_row=2 * max_pairs_per_row, pad_id=pad_id)


def token_stats(arrays, num_examples):
    """{padding_fraction, tokens_per_example}: the share of row slots that are padding, and row slots
    (what the model computes on) per example (a pair for DPO arrays, a sequence for SFT ones)."""
    segment_keys = [key for key in arrays if key.endswith("segment_ids")]
    total = sum(arrays[key].size for key in segment_keys)
    real = sum(int(np.count_nonzero(arrays[key])) for key in segment_keys)
    return {"padding_fraction": 1.0 - real / max(total, 1), "tokens_per_example": total / max(num_examples, 1)}


# ---------------------------------------------------------------------------------------------
# Prompts (sampling: PPO rollouts, sample evaluation)
# ---------------------------------------------------------------------------------------------

def _right_padded(sequences, width, pad_id):
    """[len(sequences), width] int32 of token lists (each <= width long), padded on the right."""
    rows = np.full((len(sequences), width), pad_id, np.int32)
    for row, tokens in enumerate(sequences):
        rows[row, :len(tokens)] = tokens
    return rows


def prompt_arrays(prompts, references, *, max_prompt_length, max_length, pad_id=0):
    """{prompt_ids [n, max_prompt_length], prompt_lengths [n], reference_ids [n, max_length],
    reference_lengths [n]} (int32, right-padded) of already truncated prompts and their reference responses.

    Prompts are right-padded: a sampler starts each row's generation after its own length.
    """
    return dict(prompt_ids=_right_padded(prompts, max_prompt_length, pad_id),
                prompt_lengths=np.array([len(prompt) for prompt in prompts], np.int32).reshape(-1),
                reference_ids=_right_padded(references, max_length, pad_id),
                reference_lengths=np.array([len(reference) for reference in references], np.int32).reshape(-1))
