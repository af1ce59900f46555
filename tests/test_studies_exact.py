"""Exact evaluation (studies/exact.py): against brute force over samples, subsets and responses."""

import itertools
import json

import numpy as np
import pytest

from openrlhf_infalign.studies import exact


def _brute(pa, pb, ra, n, worst=False):
    """P(best (worst) of n from law a beats that of n from law b), ties 1/2, by enumerating all n-tuples."""
    total = 0.0
    support = range(len(ra))
    for xs in itertools.product(support, repeat=n):
        wx = np.prod([pa[i] for i in xs])
        if wx == 0:
            continue
        for ys in itertools.product(support, repeat=n):
            wy = np.prod([pb[i] for i in ys])
            a = min(ra[i] for i in xs) if worst else max(ra[i] for i in xs)
            b = min(ra[i] for i in ys) if worst else max(ra[i] for i in ys)
            total += wx * wy * (1.0 if a > b else 0.5 if a == b else 0.0)
    return total


def test_win_rates_equal_enumeration_with_ties():
    rng = np.random.default_rng(0)
    rewards = np.array([[0.3, 1.0, 1.0, -2.0, 0.3]])  # ties across responses
    pa, pb = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5))
    w = exact.win_rates(np.log(pa)[None], np.log(pb)[None], rewards, ns=(1, 2, 3))
    for i, n in enumerate((1, 2, 3)):
        assert w["bon"][i, 0] == pytest.approx(_brute(pa, pb, rewards[0], n), abs=1e-12)
        assert w["won"][i, 0] == pytest.approx(_brute(pa, pb, rewards[0], n, worst=True), abs=1e-12)
    same = exact.win_rates(np.log(pb)[None], np.log(pb)[None], rewards, ns=(1, 4))
    assert np.allclose(same["bon"], 0.5) and np.allclose(same["won"], 0.5)


def test_expectation_given_the_store_equals_subset_enumeration():
    rng = np.random.default_rng(1)
    rewards = np.array([[0.125, 0.5, 0.75, 0.5, 2.0, -1.0]])  # float32-exact, as reward_matrix stores them
    p = rng.dirichlet(np.ones(6))
    store = [np.array([0.5, 0.25, 0.75, 0.75, -3.0])]  # K = 5, ties with responses and within
    got = exact.win_rates_vs_store(np.log(p)[None], rewards, store, ns=(1, 2, 3))
    for i, n in enumerate((1, 2, 3)):
        for kind, pick in (("bon", max), ("won", min)):
            want = 0.0
            subsets = list(itertools.combinations(store[0], n))
            for xs in itertools.product(range(6), repeat=n):
                a = pick(rewards[0][j] for j in xs)
                w = np.prod([p[j] for j in xs])
                for sub in subsets:
                    b = pick(sub)
                    want += w / len(subsets) * (1.0 if a > b else 0.5 if a == b else 0.0)
            assert got[kind][i, 0] == pytest.approx(want, abs=1e-12), (kind, n)


def test_kl_and_the_hook_target():
    p, q = np.array([[0.5, 0.3, 0.2]]), np.array([[0.2, 0.4, 0.4]])
    assert exact.kl(np.log(p), np.log(q))[0] == pytest.approx(np.sum(p * np.log(p / q)))
    # the hook weighs the model's own log-probs by the sampled law
    m, mq = np.log(p * 0.9), np.log(q * 0.8)
    assert exact.kl(m, mq, weights_logp=np.log(p))[0] == pytest.approx(np.sum(p * (m - mq)))


def test_responses_follow_vllm_min_tokens_and_eos():
    r = exact.enumerate_responses(vocab=4, max_new_tokens=2, eos_id=2, min_new_tokens=1)
    # first token any of the 3 non-EOS; second any of 4 (EOS included): no lone EOS (min_tokens=1)
    assert len(r.tokens) == 3 * 4 and (2,) not in r.tokens and all(len(t) == 2 for t in r.tokens)
    r0 = exact.enumerate_responses(vocab=4, max_new_tokens=2, eos_id=2, min_new_tokens=0)
    assert (2,) in r0.tokens and len(r0.tokens) == 1 + 3 * 4
    r3 = exact.enumerate_responses(vocab=3, max_new_tokens=3, eos_id=0, min_new_tokens=1)
    assert len(r3.tokens) == len(set(r3.tokens)) == 2 * 1 + 2 * 2 * 3  # ends at its EOS or at the cap
    with pytest.raises(ValueError, match="too many"):
        exact.enumerate_responses(vocab=1000, max_new_tokens=3, eos_id=0)


def test_policy_law_matches_the_model_and_masks_eos_first(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_infalign.demo import pairs

    pairs.build_policy(tmp_path / "policy", seed=2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    prompts = ["name a pair for the red fox", "name a pair for the old lake"]
    ids = [tok(pairs.INPUT_TEMPLATE.format(p), add_special_tokens=False)["input_ids"] for p in prompts]
    r = exact.enumerate_responses(len(tok), 2, tok.eos_token_id, 1)
    sampling, model = exact.Policy(tmp_path / "policy", ids, r).logprobs()
    assert np.allclose(np.exp(sampling).sum(1), 1.0)
    # the model's own law puts the rest on a first-token EOS: its total over these responses is 1 - p(EOS first)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    with torch.no_grad():
        eos_first = torch.softmax(m(input_ids=torch.tensor([ids[0]])).logits[0, -1].double(), -1)[tok.eos_token_id]
        y = r.tokens[17]
        want = torch.log_softmax(m(input_ids=torch.tensor([ids[0] + list(y)])).logits[0, -3:].double(), -1)
    assert np.exp(model[0]).sum() == pytest.approx(1 - eos_first.item(), abs=1e-9)
    assert model[0, 17] == pytest.approx((want[-3, y[0]] + want[-2, y[1]]).item(), abs=1e-9)


def test_run_evaluation_writes_the_log_and_checks_the_hook(tmp_path):
    pytest.importorskip("transformers")
    from openrlhf_infalign.demo import pairs
    from openrlhf_infalign.evallog import EXACT_LOG, append_record, load_eval_log
    from openrlhf_infalign.files import write_text

    pairs.build_policy(tmp_path / "policy", seed=3)
    pairs.write_reward_func(tmp_path / "reward_func.py")
    prompts = pairs.make_prompts(3, seed=0)
    write_text(tmp_path / "eval.jsonl", "".join(json.dumps({"input": p}) + "\n" for p in prompts))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "global_step2_hf"
    ckpt.mkdir(parents=True)
    pairs.build_policy(ckpt, seed=4)  # another policy of the same shape stands for a trained one
    stat = {"win_rate": 0.55, "stderr": 0.02}
    append_record(run / "infalign_eval.jsonl", {"step": 2, "kl": 0.1, "kl_stderr": 0.05, "inference": "bon:4",
                                                "standard": stat, "bon": {"4": stat}, "won": {"4": stat}})
    task = exact.Task(tmp_path / "policy", tmp_path / "reward_func.py", prompts, pairs.INPUT_TEMPLATE, 2)
    exact.evaluate_runs(task, [run], progress=False)
    records = load_eval_log(run / EXACT_LOG)
    assert [r["step"] for r in records] == [0, 2] and records[0]["kl"] == 0.0
    assert records[0]["bon"]["4"]["win_rate"] == pytest.approx(0.5) and records[1]["kl"] > 0
    assert records[1]["kl_estimator"] == "exact" and records[1]["inference"] == "bon:4"
    hook = records[1]["hook"]
    assert hook["z"]["bon_4"] == pytest.approx((0.55 - records[1]["bon"]["4"]["win_rate"]) / 0.02)
    assert hook["z_kl"] == pytest.approx((0.1 - hook["kl_target"]) / 0.05)


def test_tilt_profile_recovers_a_tilt_by_quantile():
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=(3, 400)).astype(np.float32).astype(np.float64)
    base = np.log(rng.dirichlet(np.ones(400), size=3))
    # policy tilted by f(u) = 2 u^2 of each response's base quantile
    u = np.empty_like(rewards)
    for p in range(3):
        order = np.argsort(rewards[p])
        cum = np.cumsum(np.exp(base[p])[order])
        u[p, order] = cum - 0.5 * np.exp(base[p])[order]
    logp = base + 2 * u**2
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    prof = exact.tilt_profile(logp, base, rewards, bins=8)
    centres = (np.arange(8) + 0.5) / 8
    assert np.allclose(prof - prof.mean(), 2 * centres**2 - np.mean(2 * centres**2), atol=0.03)


def test_theory_tilt_shapes():
    ident = np.array(exact.theory_tilt("identity", 0.15))
    assert np.allclose(np.diff(ident), np.diff(ident)[0], rtol=1e-3)  # a straight line: g = exp(u / beta) / Z
    top = np.array(exact.theory_tilt("exp:t=12.63", 0.15))
    assert np.diff(top)[-1] > 5 * np.diff(ident)[-1] and abs(np.diff(top)[0]) < 0.01  # all of it at the top
    assert exact.theory_tilt(None, 0.15) is None
