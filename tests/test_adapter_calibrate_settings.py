"""`infalign calibrate` settings: the flags are generated from CalibrateSettings and read back without loss."""

import argparse
import dataclasses

import pytest

from openrlhf_infalign.adapter.calibrate import CalibrateSettings, CalibrationError, settings_from_args
from openrlhf_infalign.commands import calibrate as command

REQUIRED = ["--pretrain", "sft/", "--data.prompt_dataset", "prompts.jsonl", "--out", "refs/"]


def parse(argv):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    command.add_arguments(parser)
    return parser, parser.parse_args(argv)


def test_defaults_of_the_flags_are_the_dataclass_defaults():
    _, args = parse(REQUIRED)
    s = settings_from_args(args)
    for f in dataclasses.fields(CalibrateSettings):
        if f.default is not dataclasses.MISSING:
            assert getattr(s, f.name) == f.default, f.name
    assert (s.policy, s.prompt_dataset, s.out) == ("sft/", "prompts.jsonl", "refs/")
    assert args.json is False  # a command flag, not a setting of the job
    assert not hasattr(s, "json")


def test_flags_spellings_and_negated_switches():
    argv = REQUIRED + ["--train.seed", "7", "--shard-size", "3", "--no-prompts", "--no-progress", "--k", "5"]
    argv += ["--reward.remote_url", "http://rm", "--reward.normalize_enable", "--ds.param_dtype", "fp32"]
    argv += ["--rollout.max_new_tokens", "9", "--data.max_len", "64", "--backend", "hf"]
    _, args = parse(argv)
    assert getattr(args, "actor.model_name_or_path") == "sft/" and args.no_prompts and args.shard_size == 3
    s = settings_from_args(args)
    assert (s.seed, s.shard_size, s.k, s.max_new_tokens, s.max_len) == (7, 3, 5, 9, 64)
    assert s.store_prompts is False and s.progress is False
    assert s.reward_url == "http://rm" and s.normalize_reward and s.param_dtype == "fp32" and s.backend == "hf"
    s.validate()


def test_help_lists_every_setting_with_its_default():
    parser, _ = parse(REQUIRED)
    text = parser.format_help()
    for f in dataclasses.fields(CalibrateSettings):
        for flag in f.metadata["flags"]:
            assert flag in text, flag
    assert "reference samples per prompt (K; below 16 warns) (default: 32)" in " ".join(text.split())
    with pytest.raises(SystemExit):
        parse(["--pretrain", "sft/"])  # --data.prompt_dataset and --out are required


def test_validate_names_the_flag(tmp_path):
    rf = tmp_path / "rf.py"
    rf.write_text("def reward_func(queries, prompts, labels):\n    return {'rewards': [0.0] * len(queries)}\n")
    base = dict(policy="sft/", prompt_dataset="p.jsonl", out="refs/", reward_url=str(rf))
    cases = [
        (dict(k=0), "--k must be >= 1"),
        (dict(shard_size=0), "--shard-size must be >= 1"),
        (dict(backend="tpu"), "--backend must be vllm or hf"),
        (dict(temperature=-1.0), "bad sampling parameters"),
        (dict(top_p=0.0), "bad sampling parameters"),
        (dict(max_new_tokens=4096), "must be in \\[1, --data.max_len 2048\\)"),
        (dict(num_engines=0), "--vllm.num_engines"),
        (dict(reward_url=f"{rf},http://rm"), "cannot be mixed"),
        (dict(reward_model="rm/"), "exactly one reward source"),
        (dict(reward_url=None), "exactly one reward source"),
    ]
    for change, message in cases:
        with pytest.raises(CalibrationError, match=message):
            CalibrateSettings(**dict(base, **change)).validate()
    with pytest.warns(UserWarning, match="not in --data.input_template"):
        s = CalibrateSettings(**base, input_template="no placeholder")
        s.validate()
    assert s.input_template is None and s.reward_kind == "reward_func"
    assert CalibrateSettings(**dict(base, reward_url="http://a, http://b")).reward_urls == ["http://a", "http://b"]


def test_out_is_checked_before_any_model_or_dataset_is_loaded(tmp_path, capsys):
    # The policy does not exist: each error below must come from the --out check, before anything is loaded.
    from openrlhf_infalign.cli import main

    rf = tmp_path / "rf.py"
    rf.write_text("def reward_func(queries, prompts, labels):\n    return {'rewards': [0.0] * len(queries)}\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "p.jsonl").write_text('{"input": "x"}\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "no_policy").mkdir()  # exists, yet holds no model: loading it would fail differently
    (tmp_path / "work.partial").mkdir()
    (tmp_path / "work.partial" / "thesis.tex").write_text("mine")
    base = ["calibrate", "--pretrain", str(tmp_path / "no_policy"), "--reward.remote_url", str(rf), "--overwrite"]
    base += ["--data.prompt_dataset", str(data / "p.jsonl"), "--backend", "hf", "--out"]
    for out, words in [
        (mine, "mine is not a reference store (it has no manifest.json)"),
        (data, "p.jsonl is inside the output"),
        (tmp_path / "a_file", "a_file is a file, not a store directory"),
        (tmp_path / "no_policy" / "refs", "is inside the input folder"),
        (tmp_path / "work", "work.partial is where `infalign calibrate --out"),
    ]:
        assert main(base + [str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Repo id" not in err, err
    assert (mine / "notes.txt").read_text() == "mine" and (tmp_path / "a_file").read_text() == "mine"
    assert (data / "p.jsonl").is_file() and (tmp_path / "work.partial" / "thesis.tex").is_file()
