"""A corpus of movie-review-like texts with varied sentiment, generated offline (no download).

The DPO paper's controlled-sentiment experiment prompts a model with prefixes of IMDb reviews and
rewards positive completions, as judged by a sentiment classifier. Its small-scale stand-in here
pretrains a small decoder from scratch on these reviews, fine-tunes it on review continuations,
and scores completions with VADER (the `vaderSentiment` lexicon scorer). So the reviews are built
from ordinary English sentiment words that VADER's lexicon holds (good, great, wonderful, ... /
bad, boring, awful, ...) and neutral film words (the plot, the acting, a young teacher, ...), in
sentence templates with some grammar variety: present or past tense, "I thought ..." and
"I found ...", exclamations, intensifiers, negations, contrasts ("..., but ..."), plot
summaries, verdicts and ratings.

Each review has a tone, drawn first: positive or negative (35% each), mixed or neutral (15%
each). Its opinion sentences are positive with a probability set by the tone (positive: 0.75-1,
negative: 0-0.25, mixed: 0.35-0.65); a neutral review is mostly plot and circumstance. A review
has 2-6 sentences (10-55 words, 30 on average; 37 tokens of the 1024-token BPE below): an
opening (plot, an opinion, or where it was seen), the opinions, and usually a verdict of the
tone. The first of `make_reviews(1, seed=0)`, and the SFT example it would make with a 5-word prompt:

    I saw this musical on DVD. I regretted the music. This was a bad film. I despised the
    characters. It is one of the worst films of the year.

    {"prompt": "I saw this musical on", "completion": " DVD. I regretted the music. This was a bad film.
     I despised the characters."}

Over 5000 reviews (seed 0), VADER's compound score has mean 0.06 and standard deviation 0.74;
48% of the reviews score above 0.05, 43% below -0.05 (and 9% in between).

`write_corpus` writes the experiment's files into a directory:
  - `pretrain.jsonl`, `pretrain_eval.jsonl`: {"text": review};
  - `sft_train.jsonl`, `sft_eval.jsonl`: {"prompt", "completion"} in the shape of the IMDb task's
    prefixes: the prompt is the review's first 2-8 words; the completion is " " + what follows,
    up to the end of the sentence in which it reaches `COMPLETION_MIN_WORDS` words (or the
    review's end): a continuation that ends at a sentence end and is short enough for a small
    model's context. With the 1024-token BPE, completions are 19 tokens on average (5th-95th
    percentile 14-25, at most about 36) and prompts 6 (2-20: rare words take several tokens, so
    give `data.max_prompt_length` >= 20 to keep whole prompts);
  - `tokenizer/`: a byte-level BPE (`tokenize.train_byte_level_bpe`) of `vocab_size` trained on the
    pretraining texts, a model directory for `config.data.tokenizer`. Prompts end at a word and
    completions start with a space, so `data.check_boundaries` holds at every split;
  - `manifest.json`: the parameters, written last: a rerun with the same parameters finds it and
    does nothing, so an interrupted experiment resumes. Every file is written atomically.
All four text splits are distinct reviews of one `make_reviews` sequence, deterministic in `seed`.
"""

import os
import shutil

import numpy as np

from dpo_jax import storage
from dpo_jax.data import tokenize

CORPUS_VERSION = 1  # bump when the generator changes, so that existing corpora are regenerated
COMPLETION_MIN_WORDS = 12
PROMPT_WORDS = (2, 8)  # the prompt's word count, drawn per SFT review (the IMDb task's 2-8 word prefixes)
TONES = ("positive", "negative", "mixed", "neutral")
TONE_PROBABILITIES = (0.35, 0.35, 0.15, 0.15)
_REVIEW_STREAM, _SPLIT_STREAM = 0, 1  # random streams of seed: one per review, and the SFT prompts' lengths

# Sentiment words, each in VADER's lexicon with the sign of its list (tests/test_reviews.py checks).
POSITIVE_ADJECTIVES = ("good", "great", "wonderful", "excellent", "brilliant", "beautiful", "amazing", "fantastic",
                       "delightful", "charming", "superb", "enjoyable", "impressive", "lovely", "perfect", "clever",
                       "entertaining", "powerful", "thrilling", "heartwarming", "terrific", "outstanding", "funny",
                       "engaging", "nice", "smart", "sweet", "gorgeous", "interesting", "fun")
NEGATIVE_ADJECTIVES = ("bad", "awful", "terrible", "boring", "dull", "horrible", "weak", "stupid", "painful",
                       "annoying", "disappointing", "poor", "ugly", "pathetic", "dreadful", "lame", "confusing",
                       "lazy", "ridiculous", "messy", "awkward", "dumb")
POSITIVE_VERBS = ("loved", "enjoyed", "liked", "adored", "admired")
NEGATIVE_VERBS = ("hated", "disliked", "despised", "regretted")
POSITIVE_NOUNS = ("a masterpiece", "a delight", "a treat", "a joy to watch", "a pleasure")
NEGATIVE_NOUNS = ("a mess", "a disaster", "a failure", "a waste of time", "a disappointment", "a bore")
# VADER's boosters (they scale the next sentiment word), none a sentiment word itself.
INTENSIFIERS = ("", "", "", "", "very ", "really ", "absolutely ", "so ", "quite ", "incredibly ", "extremely ",
                "somewhat ")

# Neutral words: none of these is in VADER's lexicon (tests/test_reviews.py checks).
ASPECTS = {  # noun phrase: whether it is plural (for is / are)
    "the acting": False, "the plot": False, "the story": False, "the script": False, "the dialogue": False,
    "the ending": False, "the music": False, "the soundtrack": False, "the cinematography": False,
    "the photography": False, "the pacing": False, "the cast": False, "the direction": False,
    "the lead actress": False, "the lead actor": False, "the main character": False, "the first half": False,
    "the second half": False, "the final scene": False, "the visual effects": True, "the costumes": True,
    "the editing": False, "the score": False, "the performances": True, "the characters": True,
}
FILM_NOUNS = ("film", "movie", "picture", "drama", "musical", "western", "mystery", "documentary")
CHARACTERS = ("a young teacher", "an old detective", "a country doctor", "two brothers", "a retired pilot",
              "a farmer", "a musician", "a journalist", "a nurse", "a taxi driver", "a family", "an architect",
              "a student", "a painter", "a police officer", "three sisters", "a chef", "a widow")
ACTIONS = ("moves to a new city", "returns home after many years", "travels across the country",
           "opens a restaurant", "searches for her brother", "works at a hotel", "starts a band",
           "buys an old house", "takes a job at a newspaper", "meets a stranger on a train", "runs for mayor",
           "writes a book", "sails to an island", "inherits a farm")
PLACES = ("a small town", "Chicago", "Paris", "a fishing village", "New York", "the desert", "London",
          "a mountain village", "Rome", "a big city", "the suburbs", "Texas")
DECADES = ("1950s", "1960s", "1970s", "1980s", "1990s")
ACTORS = ("John Carter", "Mary Evans", "Tom Hayes", "Anna Price", "David Moore", "Laura Ward", "Peter Lane",
          "Susan Clark", "Mark Dunn", "Helen Reed")
OCCASIONS = ("at the cinema", "on television", "with my family", "last weekend", "on a long flight",
             "with my wife", "with my brother", "on a Sunday afternoon", "at a film club", "on DVD")
DURATIONS = ("about two hours", "ninety minutes", "almost three hours", "a little over an hour")


def _capitalized(sentence):
    return sentence[0].upper() + sentence[1:]


def _with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plot_sentence(rng, past):
    """A neutral sentence about the film's story, cast or making."""
    character, place = rng.choice(CHARACTERS), rng.choice(PLACES)
    templates = (
        f"the story follows {character} who {rng.choice(ACTIONS)}.",
        f"it is set in {place} in the {rng.choice(DECADES)}.",
        f"{rng.choice(ACTORS)} stars as {character} who {rng.choice(ACTIONS)}.",
        f"the {rng.choice(FILM_NOUNS)} is about {character} in {place}.",
        f"most of it takes place in {place}.",
        f"it runs {rng.choice(DURATIONS)}.",
        f"{rng.choice(ACTORS)} directed it in the {rng.choice(DECADES)}.",
        f"halfway through, the story {'moved' if past else 'moves'} to {place}.",
    )
    return templates[rng.integers(len(templates))]


def _occasion_sentence(rng):
    """A neutral sentence about when and how the reviewer saw the film (in the past tense, whatever the review's)."""
    templates = (f"I watched it {rng.choice(OCCASIONS)}.",
                 f"I saw this {rng.choice(FILM_NOUNS)} {rng.choice(OCCASIONS)}.",
                 f"we rented it {rng.choice(OCCASIONS)}.")
    return templates[rng.integers(len(templates))]


def _opinion_sentence(rng, positive, past):
    """A sentence of one polarity (or, one time in eleven, a contrast whose second clause has it: VADER
    weighs the clause after "but" more, and so do readers)."""
    adjectives = POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES
    opposites = NEGATIVE_ADJECTIVES if positive else POSITIVE_ADJECTIVES
    aspect, other_aspect = rng.choice(list(ASPECTS), size=2, replace=False)
    was = lambda phrase: "were" if ASPECTS[phrase] else "was"
    be = lambda phrase: was(phrase) if past else ("are" if ASPECTS[phrase] else "is")
    adjective, second_adjective = rng.choice(adjectives, size=2, replace=False)
    intensifier, film = rng.choice(INTENSIFIERS), rng.choice(FILM_NOUNS)
    templates = (
        f"{aspect} {be(aspect)} {intensifier}{adjective}.",
        f"I thought {aspect} {was(aspect)} {intensifier}{adjective}.",
        f"I found {aspect} {intensifier}{adjective}.",
        f"what {_with_article(adjective)} {film}!",
        f"this {'was' if past else 'is'} {_with_article(intensifier + adjective)} {film}.",
        f"I {rng.choice(POSITIVE_VERBS if positive else NEGATIVE_VERBS)} {aspect}.",
        f"{aspect} {be(aspect)} {adjective} and {second_adjective}.",
        f"it {'was' if past else 'is'} {rng.choice(POSITIVE_NOUNS if positive else NEGATIVE_NOUNS)}.",
        f"{aspect} {be(aspect)} not {rng.choice(opposites)}.",  # a negation: VADER flips the opposite word
        f"the {film} {'was' if past else 'is'} {intensifier}{adjective} from start to finish.",
        f"{aspect} {be(aspect)} {rng.choice(opposites)}, but {other_aspect} {be(other_aspect)} {adjective}.",
        f"although {aspect} {be(aspect)} {rng.choice(opposites)}, {other_aspect} {be(other_aspect)} "
        f"{intensifier}{adjective}.",
    )
    # The contrasts (the last two) are rarer than the plain sentences.
    weights = np.array([1.0] * (len(templates) - 2) + [0.5, 0.5])
    return templates[rng.choice(len(templates), p=weights / weights.sum())]


def _verdict_sentence(rng, tone):
    """A closing sentence of the review's tone; a rating out of 10 matching it one time in three."""
    if rng.random() < 1 / 3:
        low, high = {"positive": (7, 10), "negative": (1, 4), "mixed": (4, 7), "neutral": (5, 6)}[tone]
        return f"I give it {rng.integers(low, high + 1)} out of 10."
    options = {
        "positive": ("overall, I would recommend it.", "I would happily watch it again.", "definitely worth watching.",
                     "it is one of the best films of the year.", "highly recommended."),
        "negative": ("overall, I would not recommend it.", "it was a waste of my time.", "avoid it.",
                     "it is one of the worst films of the year.", "I wanted my money back."),
        "mixed": ("it has its moments.", "in the end it is an average film.", "watch it and decide for yourself."),
        "neutral": ("in the end it is an average film.", "watch it and decide for yourself.",
                    "make up your own mind."),
    }[tone]
    return options[rng.integers(len(options))]


def _review(rng):
    tone = TONES[rng.choice(len(TONES), p=TONE_PROBABILITIES)]
    past = rng.random() < 0.5
    positive_probability = {"positive": rng.uniform(0.75, 1.0), "negative": rng.uniform(0.0, 0.25),
                            "mixed": rng.uniform(0.35, 0.65), "neutral": 0.5}[tone]
    opinion = lambda: _opinion_sentence(rng, rng.random() < positive_probability, past)
    opening = rng.random()
    if tone == "neutral" or opening < 0.5:
        sentences = [_plot_sentence(rng, past)]
    elif opening < 0.85:
        sentences = [opinion()]
    else:
        sentences = [_occasion_sentence(rng)]
    if tone == "neutral":
        sentences += [_plot_sentence(rng, past) if rng.random() < 0.6 else _occasion_sentence(rng)
                      for _ in range(rng.integers(1, 3))]
        sentences += [opinion() for _ in range(rng.integers(0, 2))]
    else:
        sentences += [opinion() for _ in range(rng.integers(2, 5))]
    if rng.random() < 0.8:
        sentences.append(_verdict_sentence(rng, tone))
    return " ".join(_capitalized(sentence) for sentence in sentences)


def make_reviews(num_reviews, *, seed):
    """`num_reviews` review texts, deterministic in `seed`; review i does not depend on `num_reviews`."""
    return [_review(np.random.default_rng([seed, _REVIEW_STREAM, index])) for index in range(num_reviews)]


def split_review(review, num_prompt_words):
    """(prompt, completion): the review's first `num_prompt_words` words, and " " + what follows up to
    the end of the sentence in which it reaches COMPLETION_MIN_WORDS words (or the review's end)."""
    words = review.split(" ")
    num_prompt_words = min(num_prompt_words, len(words) - 1)
    end = num_prompt_words
    while end < len(words):
        end += 1
        if end - num_prompt_words >= COMPLETION_MIN_WORDS and words[end - 1][-1] in ".!?":
            break
    return " ".join(words[:num_prompt_words]), " " + " ".join(words[num_prompt_words:end])


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

FILES = {"pretrain": "pretrain.jsonl", "pretrain_eval": "pretrain_eval.jsonl", "sft_train": "sft_train.jsonl",
         "sft_eval": "sft_eval.jsonl", "tokenizer": "tokenizer"}
MANIFEST = "manifest.json"


def _read_manifest(path):
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return None


def write_corpus(out_dir, *, num_pretrain, num_sft_train, num_sft_eval, seed, vocab_size=1024,
                 num_pretrain_eval=None):
    """Writes the corpus into `out_dir` (see the module docstring) unless its manifest shows these parameters.

    num_pretrain_eval: held-out pretraining reviews (None: num_sft_eval). Returns the paths
    {pretrain, pretrain_eval, sft_train, sft_eval, tokenizer}, for `config.data`'s `pretrain_files`,
    `pretrain_eval_files`, `sft_train_files`, `sft_eval_files` and `tokenizer`.
    """
    num_pretrain_eval = num_sft_eval if num_pretrain_eval is None else num_pretrain_eval
    parameters = dict(version=CORPUS_VERSION, num_pretrain=num_pretrain, num_pretrain_eval=num_pretrain_eval,
                      num_sft_train=num_sft_train, num_sft_eval=num_sft_eval, seed=seed, vocab_size=vocab_size)
    paths = {name: os.path.join(out_dir, file) for name, file in FILES.items()}
    manifest_path = os.path.join(out_dir, MANIFEST)
    if _read_manifest(manifest_path) == parameters and all(os.path.exists(path) for path in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(manifest_path):  # the files are about to change: an interruption must not leave it valid
        os.remove(manifest_path)

    sizes = {"pretrain": num_pretrain, "pretrain_eval": num_pretrain_eval, "sft_train": num_sft_train,
             "sft_eval": num_sft_eval}
    reviews = make_reviews(sum(sizes.values()), seed=seed)
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name], start = reviews[start:start + size], start + size
    for name in ("pretrain", "pretrain_eval"):
        storage.write_jsonl(paths[name], [{"text": review} for review in splits[name]], only_process_zero=False)
    prompt_words = np.random.default_rng([seed, _SPLIT_STREAM])
    for name in ("sft_train", "sft_eval"):
        rows = []
        for review in splits[name]:
            prompt, completion = split_review(review, int(prompt_words.integers(PROMPT_WORDS[0], PROMPT_WORDS[1] + 1)))
            rows.append({"prompt": prompt, "completion": completion})
        storage.write_jsonl(paths[name], rows)

    tokenizer_tmp = paths["tokenizer"] + ".tmp"
    shutil.rmtree(tokenizer_tmp, ignore_errors=True)
    tokenize.train_byte_level_bpe(splits["pretrain"], tokenizer_tmp, vocab_size=vocab_size)
    shutil.rmtree(paths["tokenizer"], ignore_errors=True)
    os.replace(tokenizer_tmp, paths["tokenizer"])

    storage.write_json(manifest_path, parameters, only_process_zero=False)
    return paths
