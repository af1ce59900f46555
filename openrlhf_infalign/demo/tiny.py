"""Builders of tiny local models and data: a word-level tokenizer, a Llama policy, a reward model, a rule reward.

Everything is made on the spot from a fixed synthetic vocabulary (no hub download), small enough for a 2-core CPU:
the policy is a 2-layer Llama with head_dim 64 (vLLM's CPU backend rejects smaller heads), saved in bf16 with its
tokenizer so OpenRLHF, vLLM and transformers all load it by path. The reward model is saved in the layout OpenRLHF
0.11.2's ``get_llm_for_sequence_regression(path, "reward")`` expects: a Llama backbone under ``model.`` plus a
bias-free linear value head whose attribute name is ``config.value_head_prefix`` (``score``), and the normalisation
constants ``config.mean`` / ``config.std``.

Fitting (a brief SFT so the policy says something sensible) lives elsewhere; this module only builds.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "INPUT_TEMPLATE",
    "vocabulary",
    "build_tokenizer",
    "build_policy",
    "build_reward_model",
    "write_reward_func",
    "write_prompts",
    "make_prompts",
]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
VOCAB_SIZE = 512

# Roles and separators used by the chat template and by OpenRLHF's `--data.input_template "Q : {} A :"`.
ROLE_WORDS = ["system", "user", "assistant", "Q", "A", ":", ".", ",", "?", "!"]
STARTERS = ["tell me about", "describe", "write about", "say something about", "what about", "sing of"]
DETERMINERS = ["the", "a", "my", "your", "this", "that", "one", "some"]
ADJECTIVES = [
    "red", "blue", "green", "yellow", "white", "black", "small", "big", "old", "young",
    "quiet", "loud", "fast", "slow", "happy", "sad", "bright", "dark", "warm", "cold",
]  # fmt: skip
NOUNS = [
    "cat", "dog", "fox", "bird", "fish", "horse", "tree", "river", "house", "garden",
    "city", "road", "boat", "moon", "sun", "star", "hill", "lake", "forest", "song",
    "book", "door", "window", "cloud", "rain", "snow", "wind", "stone", "flower", "apple",
]  # fmt: skip
# Words the demo's rule reward likes (also printed in the reward_func file it writes).
FRIENDLY_WORDS = [
    "good", "kind", "nice", "gentle", "lovely", "calm", "sweet", "brave", "clever", "friendly",
    "glad", "bright", "warm", "happy", "fine", "fair", "clear", "soft", "fresh", "great",
]  # fmt: skip
OTHER_WORDS = [
    "and", "or", "but", "is", "are", "was", "it", "he", "she", "they", "we", "you", "i", "of", "in", "on", "at",
    "to", "with", "very", "so", "too", "not", "no", "yes", "there", "here", "runs", "sleeps", "sings", "flies",
    "swims", "grows", "falls", "shines", "walks", "looks", "sees", "likes", "has", "made", "went", "came", "day",
    "night", "morning", "evening", "water", "light", "home", "friend", "time", "way", "world", "life", "hand",
]  # fmt: skip

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
INPUT_TEMPLATE = "Q : {} A :"


def _dedup(words: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def vocabulary(size: int = VOCAB_SIZE) -> list[str]:
    """The fixed demo vocabulary: special tokens, roles, real words, then synthetic two-syllable words up to `size`."""
    words = _dedup(
        SPECIAL_TOKENS
        + ROLE_WORDS
        + [w for s in STARTERS for w in s.split()]
        + DETERMINERS
        + ADJECTIVES
        + NOUNS
        + FRIENDLY_WORDS
        + OTHER_WORDS
    )
    # Filler words ("bako", "mite", ...) in a fixed shuffled order, so the policy has a real 512-way choice.
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    filler = [a + b for a in syllables for b in syllables]
    random.Random(1234).shuffle(filler)
    taken = set(words)
    for w in filler:
        if len(words) >= size:
            break
        if w not in taken:
            words.append(w)
            taken.add(w)
    return words[:size]


def build_tokenizer(out_dir: str | os.PathLike, words: Sequence[str] | None = None):
    """A WordLevel tokenizer over `words` (default: :func:`vocabulary`), saved to `out_dir` with a chat template.

    Special tokens: ``<pad>`` (pad), ``<s>`` (bos), ``</s>`` (eos), ``<unk>``; whitespace pre-tokenizer (words and
    punctuation runs). ``apply_chat_template`` renders ``<s>user : ... </s> assistant :``. No post-processor: OpenRLHF
    tokenizes prompts with ``add_special_tokens=False`` anyway, so what the template writes is what the model sees.
    Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _dedup(list(SPECIAL_TOKENS) + list(words if words is not None else vocabulary()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins tokens with single spaces (no "##" pieces here), a readable round trip.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=512,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        **extra,
    )


def build_policy(out_dir: str | os.PathLike, tokenizer, seed: int = 0) -> str:
    """A randomly initialised tiny LlamaForCausalLM (hidden 128, 2 layers, 2 heads of 64), bf16 safetensors.

    The tokenizer files and a generation_config (bos/eos/pad) are saved next to it. Returns the directory path.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer)).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def build_reward_model(out_dir: str | os.PathLike, tokenizer, seed: int = 0) -> str:
    """A tiny reward model in the checkpoint layout OpenRLHF's ``get_llm_for_sequence_regression`` loads.

    Saved as ``LlamaForSequenceClassification`` with one label: its keys (``model.*`` backbone, ``score.weight``
    bias-free head) are exactly those of OpenRLHF's ``RewardModel`` with ``value_head_prefix="score"``, which is also
    written into the config (OpenRLHF prefers the config's value over its flag), with ``mean=0, std=1`` so
    ``--reward.normalize_enable`` is a no-op. The head is scaled up so scores spread over a few units instead of
    ~1e-2 (bf16 would otherwise tie most of them). Returns the directory path.
    """
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = _llama_config(tokenizer, num_labels=1, value_head_prefix="score", mean=0.0, std=1.0)
    config.architectures = ["LlamaForSequenceClassification"]
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(mean=0.0, std=1.0)
    model = model.to(torch.bfloat16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


_REWARD_FUNC = '''"""A transparent rule reward for the InfAlign tiny demo, in OpenRLHF's `reward_func` file format.

OpenRLHF (--reward.remote_url THIS_FILE.py) calls reward_func(queries, prompts, labels) with
queries = the decoded prompt + response tokens, prompts = the templated prompt strings, and reads the
"rewards" tensor (one value per query) from the returned dict ("scores" and "extra_logs" are optional).

Score of one response (its words, special tokens dropped):
  + 1.0  per distinct word that also appears in the prompt          (stays on topic)
  + 0.5  per distinct friendly word (FRIENDLY below)                 (is nice)
  + 0.1  per distinct word                                           (says something)
  - 0.2  per repeated word                                           (no babbling)
  + 1.0  if the response ends with the end-of-sequence token </s>    (finishes)
"""

import re

import torch

FRIENDLY = set(%(friendly)r)
EOS = %(eos)r
# Words of the prompt scaffolding (chat roles, "Q : ... A :") never count as on-topic.
SCAFFOLD = set(%(scaffold)r)
# One piece per token, as the demo's word-level tokenizer splits text (special tokens kept whole).
PIECE = re.compile(r"<[^<>\\s]+>|\\w+|[^\\w\\s]+")


def split_response(query, prompt):
    """The response words: the query is the prompt's tokens then the response's, decoded and joined by spaces."""
    if query.startswith(prompt):
        rest = query[len(prompt):]
        return PIECE.findall(rest)
    return query.split()[len(PIECE.findall(prompt)):]


def score(query, prompt):
    pieces = split_response(query, prompt)
    finished = bool(pieces) and pieces[-1] == EOS
    words = [w.lower() for w in pieces if not w.startswith("<") and re.match(r"\\w", w)]
    distinct = set(words)
    topic = {w.lower() for w in PIECE.findall(prompt) if re.match(r"\\w", w)} - SCAFFOLD
    on_topic = len(distinct & topic)
    friendly = len(distinct & FRIENDLY)
    repeats = len(words) - len(distinct)
    reward = 1.0 * on_topic + 0.5 * friendly + 0.1 * len(distinct) - 0.2 * repeats + (1.0 if finished else 0.0)
    return reward, on_topic, friendly, len(words)


def reward_func(queries, prompts, labels):
    parts = [score(q, p) for q, p in zip(queries, prompts)]
    rewards = torch.tensor([p[0] for p in parts], dtype=torch.float32)
    return {
        "rewards": rewards,
        "scores": rewards,
        "extra_logs": {
            "on_topic_words": torch.tensor([float(p[1]) for p in parts]),
            "friendly_words": torch.tensor([float(p[2]) for p in parts]),
            "response_words": torch.tensor([float(p[3]) for p in parts]),
        },
    }
'''


def write_reward_func(path: str | os.PathLike) -> str:
    """Write the demo's rule reward as an OpenRLHF ``reward_func`` .py file (see its docstring); returns the path."""
    scaffold = sorted({w.lower() for w in ROLE_WORDS if w.isalnum()} | {"assistant", "user", "system"})
    text = _REWARD_FUNC % {"friendly": sorted(FRIENDLY_WORDS), "eos": EOS, "scaffold": scaffold}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return str(path)


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts such as "describe the quiet river" or "tell me about a red fox and my old tree"."""
    rng = random.Random(seed)

    def phrase():
        return f"{rng.choice(DETERMINERS)} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"

    single = len(STARTERS) * len(DETERMINERS) * len(ADJECTIVES) * len(NOUNS)
    if n > single * 10:
        raise ValueError(f"write_prompts: n={n} is more than the demo vocabulary can make distinct (~{single * 10})")
    out, seen = [], set()
    while len(out) < n:
        p = f"{rng.choice(STARTERS)} {phrase()}"
        if rng.random() < 0.5:
            p += f" and {phrase()}"
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def write_prompts(path: str | os.PathLike, n: int, seed: int = 0, key: str = "input") -> str:
    """Write `n` distinct synthetic prompts as JSONL rows ``{key: prompt}``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for p in make_prompts(n, seed):
            f.write(json.dumps({key: p}) + "\n")
    os.replace(tmp, path)
    return str(path)
