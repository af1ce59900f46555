"""The word-pair task of the study: two-token answers, so that every response can be enumerated and scored.

A prompt asks for a pair of words for a topic (``name a pair for the cold river``); the answer is a quality word then
a thing (``gentle voice``). The policy is a tiny Llama over a 76-token vocabulary, fitted to answer with a uniformly
random pair, so the base policy spreads its mass over all 16 x 16 pairs and its reward distribution per prompt is
continuous (no ties). With responses of two tokens the optimiser's own noise stays far below the KL the arms are
compared at (docs/study.md), and the evaluation can be exact (``studies/exact.py``).

The reward (an OpenRLHF ``reward_func`` file written by :func:`write_reward_func`, its tables embedded) is a fixed
taste: for a prompt with topic words (adj, noun) and an answer (w1, w2),

    r = s(adj) s(noun) [ g1(w1) + a(adj, w1) + g2(w2) + b(noun, w2) + c(w1, w2) ] + o(adj) + o(noun)

with g1, g2 ~ N(0, 1) shared by every prompt (what the policy can learn quickly), a, b ~ N(0, 1/16) the topic's own
taste (what generalises to held-out prompts only through the topic words), c ~ N(0, 1/4) how well the two words go
together, and a per-topic scale s = exp(N(0, 1/4)) and offset o ~ N(0, 1): a reward model that reacts more strongly on
some topics than on others, which the raw reward's RL follows and calibration removes. A word outside its slot (a
special token, a prompt word) scores -3 in that slot.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import List, Sequence

import numpy as np

__all__ = [
    "INPUT_TEMPLATE",
    "QUALITIES",
    "THINGS",
    "vocabulary",
    "make_prompts",
    "reward_tables",
    "write_reward_func",
    "build_policy",
    "fit_policy",
]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SCAFFOLD = ["Q", ":", "A", "name", "a", "pair", "for", "the"]
TOPIC_ADJECTIVES = [
    "red", "blue", "green", "old", "young", "quiet", "loud", "fast",
    "slow", "warm", "cold", "dark", "bright", "small", "big", "sad",
]  # fmt: skip
TOPIC_NOUNS = [
    "cat", "dog", "fox", "bird", "fish", "tree", "river", "house",
    "road", "boat", "moon", "star", "hill", "lake", "song", "book",
]  # fmt: skip
QUALITIES = [
    "gentle", "brave", "clever", "lovely", "calm", "sweet", "kind", "wild",
    "proud", "shy", "merry", "grim", "noble", "plain", "rare", "true",
]  # fmt: skip
THINGS = [
    "friend", "dream", "light", "story", "garden", "stone", "flower", "voice",
    "path", "home", "wind", "rain", "snow", "heart", "sky", "field",
]  # fmt: skip
INPUT_TEMPLATE = "Q : {} A :"
MISSING = -3.0  # a slot's score when its word is not one of the slot's words


def vocabulary() -> List[str]:
    return [PAD, BOS, EOS, UNK] + SCAFFOLD + TOPIC_ADJECTIVES + TOPIC_NOUNS + QUALITIES + THINGS


def make_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct prompts ``name a pair for the <adj> <noun>`` (at most 256), in a seeded order."""
    combos = [(a, b) for a in TOPIC_ADJECTIVES for b in TOPIC_NOUNS]
    if n > len(combos):
        raise ValueError(f"the word-pair task has {len(combos)} distinct prompts, {n} were asked for")
    random.Random(seed).shuffle(combos)
    return [f"name a pair for the {a} {b}" for a, b in combos[:n]]


def reward_tables(seed: int = 7) -> dict:
    """The reward's tables (module docstring), rounded to 4 decimals as the reward file stores them."""
    rng = np.random.default_rng(seed)
    na, nn, nq, nt = len(TOPIC_ADJECTIVES), len(TOPIC_NOUNS), len(QUALITIES), len(THINGS)
    tables = {
        "g1": rng.normal(size=nq),
        "g2": rng.normal(size=nt),
        "c": 0.5 * rng.normal(size=(nq, nt)),
        "a": 0.25 * rng.normal(size=(na, nq)),
        "b": 0.25 * rng.normal(size=(nn, nt)),
        "s_adj": np.exp(0.5 * rng.normal(size=na)),
        "s_noun": np.exp(0.5 * rng.normal(size=nn)),
        "o_adj": rng.normal(size=na),
        "o_noun": rng.normal(size=nn),
    }
    return {k: np.round(v, 4).tolist() for k, v in tables.items()}


_REWARD_FUNC = '''"""The word-pair reward of the InfAlign study, an OpenRLHF ``reward_func`` file (written by studies/pairs.py).

OpenRLHF (--reward.remote_url THIS_FILE.py) calls reward_func(queries, prompts, labels): queries are the decoded
prompt + response tokens, prompts the templated prompt strings. For topic words (adj, noun) and answer (w1, w2):

    r = s(adj) s(noun) [ g1(w1) + a(adj, w1) + g2(w2) + b(noun, w2) + c(w1, w2) ] + o(adj) + o(noun)

A word outside its slot scores MISSING in that slot (and no pair term).
"""

import json

import torch

T = json.loads(%(tables)r)
TOPIC_ADJECTIVES = {w: i for i, w in enumerate(%(adjectives)r)}
TOPIC_NOUNS = {w: i for i, w in enumerate(%(nouns)r)}
QUALITIES = {w: i for i, w in enumerate(%(qualities)r)}
THINGS = {w: i for i, w in enumerate(%(things)r)}
MISSING = %(missing)r


def score(prompt, words):
    topic = prompt.split()
    adj = next(TOPIC_ADJECTIVES[w] for w in topic if w in TOPIC_ADJECTIVES)
    noun = next(TOPIC_NOUNS[w] for w in topic if w in TOPIC_NOUNS)
    i = QUALITIES.get(words[0]) if len(words) > 0 else None
    j = THINGS.get(words[1]) if len(words) > 1 else None
    q = T["g1"][i] + T["a"][adj][i] if i is not None else MISSING
    q += T["g2"][j] + T["b"][noun][j] if j is not None else MISSING
    if i is not None and j is not None:
        q += T["c"][i][j]
    return T["s_adj"][adj] * T["s_noun"][noun] * q + T["o_adj"][adj] + T["o_noun"][noun]


def reward_func(queries, prompts, labels):
    # the response is what follows the prompt in the query, one word per token
    rewards = [score(p, (q[len(p):] if q.startswith(p) else q).split()) for q, p in zip(queries, prompts)]
    r = torch.tensor(rewards, dtype=torch.float32)
    return {"rewards": r, "scores": r, "extra_logs": {}}
'''


def write_reward_func(path: str | os.PathLike, seed: int = 7) -> str:
    """Write the task's reward as an OpenRLHF ``reward_func`` .py file (atomically); returns the path."""
    text = _REWARD_FUNC % {
        "tables": json.dumps(reward_tables(seed)),
        "adjectives": TOPIC_ADJECTIVES,
        "nouns": TOPIC_NOUNS,
        "qualities": QUALITIES,
        "things": THINGS,
        "missing": MISSING,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return str(path)


def build_policy(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A randomly initialised Llama (hidden 64, one head of 64, 2 layers) with the task's tokenizer, bf16."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from openrlhf_infalign.demo import tiny

    tok = tiny.build_tokenizer(out_dir, vocabulary())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU backend rejects smaller heads
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def fit_policy(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    prompts: Sequence[str],
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    coupling: float = 0.0,
) -> dict:
    """Fit the base policy to answer every prompt with a random (quality, thing) pair, then EOS.

    coupling = 0: both words uniform, so the policy's state at the second word need not carry the first word (a
    policy that RL then moves as a product pi1(w1) pi2(w2) at first, docs/replay.md). coupling > 0: the thing is drawn
    from softmax(coupling * z[w1]) with a fixed random z ~ N(0, 1), so the state must carry the first word, as any
    real language model's does.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt_ids = [tok(INPUT_TEMPLATE.format(p), add_special_tokens=False)["input_ids"] for p in prompts]
    qualities, things = tok.convert_tokens_to_ids(QUALITIES), tok.convert_tokens_to_ids(THINGS)
    z = np.random.default_rng(seed + 77).normal(size=(len(qualities), len(things)))
    second = np.exp(coupling * z)
    second /= second.sum(axis=1, keepdims=True)  # the base's p(thing | quality)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        rows = []
        for _ in range(batch_size):
            p = prompt_ids[rng.randrange(len(prompt_ids))]
            i = rng.randrange(len(qualities))
            j = rng.choices(range(len(things)), weights=second[i])[0]
            rows.append((p + [qualities[i], things[j], tok.eos_token_id], len(p)))
        width = max(len(r) for r, _ in rows)
        ids = torch.full((batch_size, width), tok.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (r, n) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, n : len(r)] = torch.tensor(r[n:])
            mask[i, : len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".fit-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"steps": steps, "coupling": coupling, "loss_first": round(float(np.mean(losses[:10])), 4), "loss_last": round(float(np.mean(losses[-10:])), 4)}
