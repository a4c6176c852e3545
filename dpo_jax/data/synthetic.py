"""The built-in synthetic preference task: no download, learnable in minutes on a CPU.

Token ids: 0 pad, 1 BOS, 2 EOS, 3 SEP (ends the prompt), 4 "be positive", 5 "be negative",
6..7 unused, then words: the lower half of the word ids is positive, the upper half negative.

A prompt is `BOS mood topic-words SEP`. A response is a run of words then EOS; each word has
the prompt's mood with a probability drawn per response. Of two responses sampled for a prompt,
the one with the larger fraction of on-mood words is chosen (ties are redrawn): like the DPO
paper's IMDb task, where a sentiment classifier labels pairs of samples.
"""

import numpy as np

PAD, BOS, EOS, SEP, POSITIVE, NEGATIVE = 0, 1, 2, 3, 4, 5
FIRST_WORD = 8


def _response(rng, mood, vocab_size, min_len, max_len):
    """Words with a per-response probability of matching the mood; returns (ids, on-mood fraction)."""
    half = (vocab_size - FIRST_WORD) // 2
    length = int(rng.integers(min_len, max_len + 1))
    on_mood = rng.random(length) < rng.random()
    offsets = rng.integers(0, half, size=length)
    positive = on_mood if mood == POSITIVE else ~on_mood
    words = np.where(positive, FIRST_WORD + offsets, FIRST_WORD + half + offsets)
    return [int(w) for w in words] + [EOS], float(on_mood.mean())


def make_pairs(num_pairs, *, seed, vocab_size=64, prompt_words=(2, 6), response_words=(4, 12)):
    """`num_pairs` dicts of token-id lists {prompt, chosen, rejected}, deterministic in `seed`."""
    if vocab_size < FIRST_WORD + 4:
        raise ValueError(f"The synthetic task needs vocab_size >= {FIRST_WORD + 4}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < num_pairs:
        mood = POSITIVE if rng.random() < 0.5 else NEGATIVE
        topic = rng.integers(FIRST_WORD, vocab_size, size=int(rng.integers(*prompt_words, endpoint=True)))
        prompt = [BOS, mood] + [int(t) for t in topic] + [SEP]
        first, first_score = _response(rng, mood, vocab_size, *response_words)
        second, second_score = _response(rng, mood, vocab_size, *response_words)
        if first_score == second_score:
            continue
        chosen, rejected = (first, second) if first_score > second_score else (second, first)
        pairs.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs
