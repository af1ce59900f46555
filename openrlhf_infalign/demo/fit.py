"""A brief SFT of the tiny demo policy on a synthetic prompt/response corpus, so that it says varied things.

A randomly initialised policy samples uniform noise over its 512 words: every response gets about the same reward,
the reference store is a wall of ties and RL has nothing to work with. Here the policy learns, in well under a minute
on a CPU, to answer prompts in the demo's format (``Q : <prompt> A : <response> </s>``, OpenRLHF's
``--data.input_template``) with responses of deliberately MIXED quality: each training response draws its own
"quality" q ~ U[0,1] that sets how often it uses the prompt's words and friendly words, how much it babbles filler
and repeats itself, and whether it ends with ``</s>``. The fitted policy is thus a spread-out base policy pi_ref
whose samples the demo's rule reward (:func:`openrlhf_infalign.demo.tiny.write_reward_func`) ranks very
differently, which is what calibration and Best-of-N need.

Prompt tokens are tokenised exactly as OpenRLHF does at rollout time (``add_special_tokens=False``, no BOS); the
loss covers the response tokens only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from openrlhf_infalign.demo import tiny

__all__ = ["synthetic_corpus", "fit_policy", "sample_responses"]


def _filler_words() -> List[str]:
    known = set(
        tiny.SPECIAL_TOKENS
        + tiny.ROLE_WORDS
        + tiny.DETERMINERS
        + tiny.ADJECTIVES
        + tiny.NOUNS
        + tiny.FRIENDLY_WORDS
        + tiny.OTHER_WORDS
        + [w for s in tiny.STARTERS for w in s.split()]
    )
    return [w for w in tiny.vocabulary() if w not in known]


def synthetic_corpus(prompts: Sequence[str], per_prompt: int = 8, seed: int = 0) -> List[Tuple[str, str, bool]]:
    """``(prompt, response words, finished)`` triples of mixed quality (see the module docstring)."""
    rng = random.Random(seed)
    filler = _filler_words()
    content = set(tiny.ADJECTIVES) | set(tiny.NOUNS)
    out = []
    for prompt in prompts:
        topic = [w for w in prompt.split() if w in content]
        for _ in range(per_prompt):
            q = rng.random()
            words: List[str] = []
            for _ in range(rng.randint(3, 12)):
                u = rng.random()
                if words and u < 0.25 * (1.0 - q):
                    words.append(rng.choice(words))  # babbling: repeats a word it already said
                elif topic and u < 0.25 + 0.35 * q:
                    words.append(rng.choice(topic))
                elif u < 0.35 + 0.5 * q:
                    words.append(rng.choice(tiny.FRIENDLY_WORDS if rng.random() < q else tiny.OTHER_WORDS))
                else:
                    words.append(rng.choice(filler if rng.random() < 0.6 else tiny.OTHER_WORDS))
            out.append((prompt, " ".join(words), rng.random() < 0.3 + 0.6 * q))
    return out


def _encode(tokenizer, corpus, input_template: str, max_len: int):
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, response, finished in corpus:
        p = tokenizer(input_template.format(prompt), add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if finished else [])
        ids = (p + r)[:max_len]
        rows.append((ids, len(p)))
    return rows


def fit_policy(
    model_dir: str | os.PathLike,
    out_dir: Optional[str | os.PathLike] = None,
    prompts: Optional[Sequence[str]] = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    input_template: str = tiny.INPUT_TEMPLATE,
    max_len: int = 48,
    progress: bool = True,
) -> dict:
    """Fit the policy in ``model_dir`` and save it (bf16, with its tokenizer) to ``out_dir`` (default: in place).

    ``prompts``: the SFT prompts (default: 256 synthetic prompts from a seed distinct from the demo's train/eval
    sets). Returns a summary dict (steps, first/last loss, seconds). The output directory is written next to its
    final place and renamed over it, so an interrupted fit never leaves a half-written model.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.manual_seed(seed)
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    if prompts is None:
        prompts = tiny.make_prompts(256, seed=seed + 1000)
    rows = _encode(tokenizer, synthetic_corpus(prompts, seed=seed), input_template, max_len)
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    rng = random.Random(seed)
    losses = []
    for step in tqdm(range(steps), desc="fit policy (SFT)", disable=not progress):
        batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            attention[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())

    tmp = out_dir.with_name(out_dir.name + ".fit-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp)  # keeps the tokenizer and any extra files of the source
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "examples": len(rows),
        "loss_first": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
        "loss_last": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "seconds": round(time.time() - t0, 2),
    }
    (tmp / "infalign_fit.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".fit-old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return summary


def sample_responses(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    n: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    input_template: str = tiny.INPUT_TEMPLATE,
) -> List[List[str]]:
    """``n`` sampled responses per prompt with transformers' generate (a quick look at what the policy says)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(input_template.format(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                ids.repeat(n, 1),
                attention_mask=torch.ones_like(ids).repeat(n, 1),
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = [tokenizer.decode(g[ids.shape[1] :], skip_special_tokens=False) for g in gen]
        out.append([t.replace(tokenizer.pad_token, "").strip() for t in texts])
    return out
