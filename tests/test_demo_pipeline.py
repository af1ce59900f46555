"""Fast checks of the `make demo` pieces: the SFT corpus and fit, and the trainer command line.

The pipeline itself runs end to end in tests/test_e2e_cpu.py (marked ``e2e``).
"""

import json
import time
from pathlib import Path

import pytest

from openrlhf_infalign import evallog
from openrlhf_infalign.demo import fit, pipeline, tiny


def test_synthetic_corpus_has_mixed_quality():
    prompts = tiny.make_prompts(40, seed=3)
    corpus = fit.synthetic_corpus(prompts, per_prompt=8, seed=1)
    assert len(corpus) == 320
    assert {p for p, _, _ in corpus} == set(prompts)
    finished = sum(f for _, _, f in corpus) / len(corpus)
    assert 0.3 < finished < 0.9  # some responses end with </s>, some run on
    on_topic = [len(set(r.split()) & set(p.split()) & (set(tiny.ADJECTIVES) | set(tiny.NOUNS))) for p, r, _ in corpus]
    assert min(on_topic) == 0 and max(on_topic) >= 2  # from off-topic babble to on-topic answers
    vocab = set(tiny.vocabulary())
    assert all(w in vocab for _, r, _ in corpus for w in r.split())  # nothing the tokenizer maps to <unk>


@pytest.mark.openrlhf
def test_fit_policy_lowers_the_loss_and_replaces_the_model_atomically(tmp_path):
    pytest.importorskip("transformers")
    tok = tiny.build_tokenizer(tmp_path / "init")
    tiny.build_policy(tmp_path / "init", tok, seed=0)
    out = tmp_path / "policy"
    out.mkdir()
    (out / "stale.txt").write_text("old")  # the previous model directory is replaced as a whole
    summary = fit.fit_policy(tmp_path / "init", out, steps=40, batch_size=16, progress=False)
    assert summary["loss_last"] < summary["loss_first"] - 0.5, summary
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "infalign_fit.json").read_text())["steps"] == 40
    assert not list(tmp_path.glob("*.fit-tmp")) and not list(tmp_path.glob("*.fit-old"))
    samples = fit.sample_responses(out, ["describe the red fox"], n=3, max_new_tokens=8)
    assert len(samples) == 1 and len(samples[0]) == 3


def _plan_args():
    return ["--reward_wrapper", "infalign.ctrl", "--infalign.inference", "bon:4", "--algo.kl.init_coef", "0.31"]


def test_train_command_runs_upstream_trainer_in_cpu_mode_with_matching_sampling(tmp_path):
    args = pipeline.parse(["--out", str(tmp_path)])
    cmd = pipeline.train_command(Path(tmp_path), args, {"openrlhf_args": _plan_args()})
    assert cmd[1:3] == ["-m", "openrlhf_infalign.train_ppo"] and "--infalign.cpu" in cmd

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    for flag, expected in zip(_plan_args()[::2], _plan_args()[1::2]):
        assert value(flag) == expected
    # the eval store and the rollouts are sampled like the reference samples: temperature 1, same length cap
    assert value("--eval.temperature") == "1.0" and value("--rollout.temperature") == "1.0"
    assert value("--rollout.max_new_tokens") == str(args.max_new_tokens)
    assert value("--data.input_template") == pipeline.INPUT_TEMPLATE
    steps = args.train_prompts // args.rollout_batch * args.episodes
    assert steps % int(value("--eval.steps")) == 0  # an evaluation lands on the last step
    assert int(value("--train.batch_size")) == args.train_batch
    # the word-pair task keeps the actor of every evaluation for the exact evaluation, and nothing else
    assert args.task == "pairs" and args.max_new_tokens == 2
    assert value("--ckpt.save_steps") == value("--eval.steps") and "--ckpt.save_hf" in cmd
    assert "--ckpt.disable_ds" in cmd and int(value("--ckpt.max_num")) >= steps


def test_words_task_keeps_its_own_defaults_and_saves_no_checkpoints(tmp_path):
    args = pipeline.parse(["--out", str(tmp_path), "--task", "words", "--train-batch", "0"])
    assert args.max_new_tokens == 16 and args.eval_prompts == 128
    cmd = pipeline.train_command(Path(tmp_path), args, {"openrlhf_args": _plan_args()})
    assert "--ckpt.save_hf" not in cmd
    assert cmd[cmd.index("--train.batch_size") + 1] == str(args.rollout_batch * args.n_samples_per_prompt)
    with pytest.raises(SystemExit):
        pipeline.parse(["--out", str(tmp_path), "--reward", "rm"])  # the pairs task has no reward model


def test_summary_takes_first_and_final_best_of_n_from_the_eval_log(tmp_path):
    def record(step, kl, bon4):
        stat = {"win_rate": bon4, "stderr": 0.02}
        return {"step": step, "kl": kl, "standard": stat, "bon": {"4": stat}, "won": {"4": stat}}

    log = evallog.eval_log_path(tmp_path)
    for rec in (record(0, None, 0.5), record(8, 0.3, 0.55), record(8, 0.4, 0.6)):  # a resumed run re-evaluated 8
        evallog.append_record(log, rec)
    summary = {"out": str(tmp_path), "args": {"inference": "bon:4"}, "phases": {"train": {"seconds": 1.0}}}
    summary["evaluations"] = evallog.load_eval_log(log)
    pipeline._write_summary(tmp_path, summary, time.time())
    written = json.loads((tmp_path / "demo_summary.json").read_text())
    assert [e["step"] for e in written["evaluations"]] == [0, 8]
    assert written["bon_win_rate"] == {
        "n": 4,
        "first": {"step": 0, "win_rate": 0.5, "stderr": 0.02},
        "final": {"step": 8, "kl": 0.4, "win_rate": 0.6, "stderr": 0.02},
    }


def test_end_vs_plan_averages_the_last_third_of_the_run():
    # A run at rest moves from one evaluation to the next; its end point is the mean of the last third.
    def rec(step, kl, w):
        return {"step": step, "kl": kl, "bon": {"4": {"win_rate": w}}}

    exact = [rec(0, 0.0, 0.5), rec(12, 0.05, 0.6), rec(24, 0.08, 0.66), rec(36, 0.09, 0.68), rec(48, 0.07, 0.64)]
    end = pipeline.end_vs_plan(exact, {"kl": 0.1, "win_rate": 0.7}, "bon:4")
    assert end["steps"] == [36, 48]
    assert end["kl"] == pytest.approx(0.08) and end["kl_ratio"] == pytest.approx(0.8)
    assert end["win_rate"] == pytest.approx(0.66) and end["win_rate_gap"] == pytest.approx(-0.04)
    assert end["last"] == {"step": 48, "kl": 0.07, "win_rate": 0.64}
    assert pipeline.end_vs_plan(exact, {"kl": 0.1, "win_rate": 0.7}, "won:4")["win_rate"] is None
