"""The word-pair task: prompts, the reward file, the tiny policy and its fit (demo/pairs.py)."""

import importlib.util
import json

import numpy as np
import pytest

from openrlhf_infalign.demo import pairs


def _load(path):
    spec = importlib.util.spec_from_file_location("pairs_reward", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompts_are_distinct_seeded_and_bounded():
    a, b = pairs.make_prompts(256, seed=3), pairs.make_prompts(256, seed=3)
    assert a == b and len(set(a)) == 256
    assert pairs.make_prompts(10, seed=4) != a[:10]
    with pytest.raises(ValueError, match="256 distinct prompts"):
        pairs.make_prompts(257)


def test_reward_file_computes_the_documented_formula(tmp_path):
    torch = pytest.importorskip("torch")
    reward = _load(pairs.write_reward_func(tmp_path / "reward_func.py"))
    t = {k: np.asarray(v) for k, v in pairs.reward_tables().items()}
    prompt = pairs.INPUT_TEMPLATE.format("name a pair for the cold river")
    adj, noun = pairs.TOPIC_ADJECTIVES.index("cold"), pairs.TOPIC_NOUNS.index("river")
    i, j = pairs.QUALITIES.index("brave"), pairs.THINGS.index("stone")
    scale, offset = t["s_adj"][adj] * t["s_noun"][noun], t["o_adj"][adj] + t["o_noun"][noun]
    expected = scale * (t["g1"][i] + t["a"][adj, i] + t["g2"][j] + t["b"][noun, j] + t["c"][i, j]) + offset
    # OpenRLHF's query: prompt tokens + response tokens decoded with spaces, special tokens kept
    out = reward.reward_func([prompt + " brave stone", prompt + " stone brave", prompt + " </s>"], [prompt] * 3, [None] * 3)
    assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].dtype == torch.float32
    assert out["rewards"][0].item() == pytest.approx(expected, rel=1e-6)
    missing = scale * 2 * pairs.MISSING + offset  # words in the wrong slots score MISSING in both
    assert out["rewards"][1].item() == pytest.approx(missing, rel=1e-6)
    assert out["rewards"][2].item() == pytest.approx(missing, rel=1e-6)
    # nearly continuous within a prompt: ties among the 256 answers are rare (tables rounded to 4 decimals)
    words = [prompt + f" {q} {w}" for q in pairs.QUALITIES for w in pairs.THINGS]
    assert len(set(reward.reward_func(words, [prompt] * 256, [None] * 256)["rewards"].tolist())) >= 250


def test_fitted_policy_spreads_over_the_pairs(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs.build_policy(tmp_path / "init", seed=0)
    summary = pairs.fit_policy(tmp_path / "init", tmp_path / "policy", pairs.make_prompts(64, seed=1), steps=60)
    assert summary["loss_last"] < summary["loss_first"] - 1.0, summary
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert len(tok) == len(pairs.vocabulary())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    ids = tok(pairs.INPUT_TEMPLATE.format("name a pair for the red fox"), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    first = p[tok.convert_tokens_to_ids(pairs.QUALITIES)]
    assert first.sum() > 0.8 and first.max() < 5 * first.min(), first  # broad over the 16 quality words
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["head_dim"] == 64  # vLLM CPU's minimum


def test_coupled_base_makes_the_second_word_depend_on_the_first(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs.build_policy(tmp_path / "init", seed=0)
    spread = {}
    for coupling in (0.0, 2.0):
        out = tmp_path / f"policy{coupling}"
        pairs.fit_policy(tmp_path / "init", out, pairs.make_prompts(32, seed=1), steps=80, coupling=coupling)
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ids = tok(pairs.INPUT_TEMPLATE.format("name a pair for the red fox"), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + [q] for q in tok.convert_tokens_to_ids(pairs.QUALITIES)]))
        p = torch.softmax(logits.logits[:, -1], -1)[:, tok.convert_tokens_to_ids(pairs.THINGS)]
        spread[coupling] = (p - p.mean(0)).abs().sum(1).mean().item()  # how much p(thing | quality) varies
    assert spread[2.0] > 5 * spread[0.0], spread
