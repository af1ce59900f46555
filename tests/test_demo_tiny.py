"""The tiny local models load with the real loaders (transformers, OpenRLHF's reward-model loader) and behave."""

import importlib.util
import json

import pytest
import torch

from openrlhf_infalign.demo import tiny


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = tiny.build_tokenizer(d / "tok")
    return {
        "dir": d,
        "tok": tok,
        "policy": tiny.build_policy(d / "policy", tok, seed=0),
        "rm": tiny.build_reward_model(d / "rm", tok, seed=0),
        "rf": tiny.write_reward_func(d / "reward_func.py"),
    }


def test_tokenizer_roundtrip_and_chat_template(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["policy"])
    assert len(tok) == tiny.VOCAB_SIZE
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "tell me about the red fox"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s>user : tell me about the red fox </s> assistant :"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.unk_token_id not in ids  # every template and prompt word is in the vocabulary
    assert tok.decode(ids) == "<s> user : tell me about the red fox </s> assistant :"
    for p in tiny.make_prompts(50, seed=3):
        assert tok.unk_token_id not in tok(tiny.INPUT_TEMPLATE.format(p), add_special_tokens=False)["input_ids"]


def test_policy_generates_and_config(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((built["dir"] / "policy" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"]) == (
        128,
        2,
        2,
        64,
    )
    assert cfg["vocab_size"] == 512 and cfg["dtype"] == "bfloat16"
    gen = json.loads((built["dir"] / "policy" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0
    tok = AutoTokenizer.from_pretrained(built["policy"])
    model = AutoModelForCausalLM.from_pretrained(built["policy"])
    assert model.dtype == torch.bfloat16
    ids = tok(["Q : describe the red fox A :"], add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**ids, do_sample=True, top_k=0, max_new_tokens=8, num_return_sequences=4)
    assert out.shape[0] == 4 and out.shape[1] > ids["input_ids"].shape[1]
    # A random init samples nearly uniformly: four samples of 8 tokens are not all the same.
    assert len({tuple(r.tolist()) for r in out}) > 1


def test_reward_model_loads_with_openrlhf(built):
    pytest.importorskip("openrlhf")
    from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

    install_flash_attn()
    from openrlhf.models import get_llm_for_sequence_regression

    model = get_llm_for_sequence_regression(built["rm"], "reward", attn_implementation="sdpa").eval()
    assert model.value_head_prefix == "score"
    tok = built["tok"]
    texts = ["Q : the red fox A : good kind fox </s>", "Q : a blue tree A : rain", "Q : my cat A : cat cat cat"]
    batch = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        rewards = model(batch["input_ids"], batch["attention_mask"]).float()
    assert rewards.shape == (3,) and torch.isfinite(rewards).all()
    assert len(set(rewards.tolist())) == 3  # the scaled head spreads scores beyond bf16 ties
    # The value head was loaded from the checkpoint, not freshly initialised by the loader.
    from safetensors.torch import load_file

    saved = load_file(str(built["dir"] / "rm" / "model.safetensors"))
    assert torch.equal(saved["score.weight"], model.score.weight.detach())
    # Left padding gives the same score as no padding (OpenRLHF takes the last attended position).
    one = tok(texts[1:2], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        alone = model(one["input_ids"], one["attention_mask"]).float()
    assert torch.allclose(alone, rewards[1:2], atol=0.1)


def _load_reward_func(path):
    spec = importlib.util.spec_from_file_location("reward_func", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reward_func_rule(built):
    mod = _load_reward_func(built["rf"])
    prompt = "Q : describe the red fox A :"
    queries = [
        prompt + " red fox good </s>",  # 2 on topic, 1 friendly, 3 distinct, finished
        prompt + " rain rain rain",  # 0, 0, 1 distinct, 2 repeats
        prompt + " kind",
    ]
    out = mod.reward_func(queries, [prompt] * 3, [""] * 3)
    r = out["rewards"]
    assert isinstance(r, torch.Tensor) and r.shape == (3,)
    assert r.tolist() == pytest.approx([2 * 1.0 + 0.5 + 0.3 + 1.0, 0.1 - 0.4, 0.5 + 0.1])
    assert out["extra_logs"]["on_topic_words"].tolist() == [2.0, 0.0, 0.0]
    # The query OpenRLHF builds is the decoded token sequence; with the chat template it no longer starts with
    # the prompt string ("<s> user" vs "<s>user"), and the rule must still find the response.
    tok = built["tok"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "the red fox"}], tokenize=False, add_generation_prompt=True
    )
    ids = (
        tok(chat, add_special_tokens=False)["input_ids"] + tok(" red good </s>", add_special_tokens=False)["input_ids"]
    )
    query = tok.decode(ids, skip_special_tokens=False)
    assert not query.startswith(chat)
    assert mod.reward_func([query], [chat], [""])["rewards"].tolist() == pytest.approx([1.0 + 0.5 + 0.2 + 1.0])


def test_prompts_distinct_and_deterministic(tmp_path):
    p = tiny.write_prompts(tmp_path / "p.jsonl", 200, seed=7)
    rows = [json.loads(line) for line in open(p)]
    assert len(rows) == 200 and len({r["input"] for r in rows}) == 200
    assert [r["input"] for r in rows] == tiny.make_prompts(200, seed=7)
    assert tiny.make_prompts(20, seed=8) != tiny.make_prompts(20, seed=7)
