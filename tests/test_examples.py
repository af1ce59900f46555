"""Example scripts cannot rot: every command they run parses with the REAL parsers, and their numbers are the plan's.

Each examples/*.sh / *.sbatch supports DRY_RUN=1 (print each command, bash-quoted, instead of running it). We run
them that way, for every TASK they accept, and parse what they print:

* `openrlhf train_ppo ...`   with OpenRLHF 0.11.2's own train_ppo_ray parser plus InfAlign's flags (what the
                              `openrlhf` console parses), i.e. every flag exists and every value has the right type;
* `infalign calibrate|report|plan ...` with the `infalign` CLI's parsers;
* `python examples/prepare_hh_prompts.py ...` with that script's parser;
* `ray job submit ... -- CMD`: the runtime env installs this package, and CMD is checked as above.

Then the pipeline's own consistency: the reference stores are built with the same prompt / template / sampling flags
the trainer and the evaluation use (or keys and step-0 win rates would not match), colocation arithmetic holds, and
the transform and KL coefficient are what `infalign plan` answers for the run's inference procedure and KL budget.
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted([*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("*.sbatch")])


def dry_run(script: Path, task: str | None) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", WORK="/work_dir", SHARED="/shared_dir")
    env.pop("RAY_ADDRESS", None)
    if task:
        env["TASK"] = task
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, f"{script.name} (TASK={task}) failed under DRY_RUN=1: {out.stderr}"
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def tasks(script: Path) -> list:
    return ["helpful", "harmless"] if "TASK=" in script.read_text() else [None]


CASES = [(s, t) for s in SCRIPTS for t in tasks(s)]


def test_there_are_examples():
    names = {s.name for s in SCRIPTS}
    assert {"hh_helpful_bon4_single_node.sh", "hh_harmless_won4_single_node.sh"} <= names
    assert any("ray_job" in n for n in names) and any(n.endswith(".sbatch") for n in names)
    assert (EXAMPLES / "README.md").is_file()


# ---- the real parsers ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_ppo_parser():
    """OpenRLHF's train_ppo_ray parser (built inline under __main__) + InfAlign's flags, as the console builds it."""
    pytest.importorskip("openrlhf")
    from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

    install_flash_attn()
    from openrlhf_infalign.adapter.upstream.train_ppo_ray import train_ppo_parser as build

    return build()


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns, unknown = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{what}: {err.getvalue().strip().splitlines()[-1]}")
    if unknown:
        pytest.fail(f"{what}: not flags of the real parser: {unknown}")
    return ns


def infalign_parser(command: str):
    from openrlhf_infalign.cli import COMMANDS, build_parser

    if command not in COMMANDS:
        pytest.fail(f"unknown infalign command {command!r}")
    try:
        importlib.import_module(f"openrlhf_infalign.commands.{COMMANDS[command]}")
    except ImportError:
        return None  # that command is not written yet: its flags cannot be checked
    return build_parser(command)


def _prepare_parser():
    spec = importlib.util.spec_from_file_location("prepare_hh_prompts", EXAMPLES / "prepare_hh_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _unwrap_ray_job(argv):
    """`ray job submit [opts] -- CMD...` -> (runtime env dict, CMD)."""
    assert "--" in argv, f"ray job submit without `--` before the entrypoint: {argv}"
    opts, cmd = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    env = json.loads(opts[opts.index("--runtime-env-json") + 1])
    return env, cmd


def commands(script, task):
    """(kind, argv) for every command the script runs; ray job entrypoints are unwrapped (kind 'ray:...')."""
    out = []
    for argv in dry_run(script, task):
        prefix = ""
        if argv[:3] == ["ray", "job", "submit"]:
            env, argv = _unwrap_ray_job(argv)
            assert "openrlhf-infalign[gpu]" in env.get("pip", []), f"{script.name}: runtime env must install us"
            prefix = "ray:"
        if argv[:2] == ["openrlhf", "train_ppo"]:
            out.append((prefix + "train_ppo", argv[2:]))
        elif argv[0] == "infalign":
            out.append((prefix + "infalign " + argv[1], argv[2:]))
        elif argv[0].startswith("python") and argv[1].endswith("prepare_hh_prompts.py"):
            out.append(("prepare", argv[2:]))
        elif argv[:1] in (["srun"], ["bash"]):
            continue
        else:
            pytest.fail(f"{script.name}: unexpected command {argv[:3]}")
    return out


# ---- every command parses ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,task", CASES, ids=[f"{s.name}-{t}" for s, t in CASES])
def test_every_command_parses(script, task, train_ppo_parser):
    cmds = commands(script, task)
    kinds = [k.split(":")[-1] for k, _ in cmds]
    assert "train_ppo" in kinds and "infalign calibrate" in kinds, f"{script.name}: not calibrate-then-train"
    assert kinds.index("infalign calibrate") < kinds.index("train_ppo")
    for kind, argv in cmds:
        kind = kind.split(":")[-1]
        what = f"{script.name} (TASK={task}) `{kind}`"
        if kind == "train_ppo":
            _parse(train_ppo_parser, argv, what)
        elif kind == "prepare":
            _parse(_prepare_parser().build_parser(), argv, what)
        else:
            name = kind.split()[1]
            parser = infalign_parser(name)
            if parser is None:
                continue
            _parse(parser, [name, *argv], what)


# ---- the pipeline is consistent ------------------------------------------------------------------------------------
_PLAN_CACHE: dict = {}


def plan_argv(inference: str, kl: float, k: int, estimator: str, n: int) -> list:
    return [
        "plan",
        "--inference",
        inference,
        "--kl-budget",
        f"{kl:g}",
        "--k",
        str(k),
        "--algo.advantage.estimator",
        estimator,
    ] + [
        "--rollout.n_samples_per_prompt",
        str(n),
        "--json",
    ]


def plan(*key) -> dict:
    if key not in _PLAN_CACHE:
        argv = plan_argv(*key)
        out = subprocess.run(
            [sys.executable, "-m", "openrlhf_infalign.cli", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        if out.returncode != 0:
            pytest.skip(f"`infalign plan` unavailable: {out.stderr.strip()[-300:]}")
        _PLAN_CACHE[key] = json.loads(out.stdout)
    return _PLAN_CACHE[key]


@pytest.mark.parametrize("script,task", CASES, ids=[f"{s.name}-{t}" for s, t in CASES])
def test_pipeline_consistency_and_plan(script, task, train_ppo_parser):
    from openrlhf_infalign.cli import build_parser
    from openrlhf_infalign.options import parse_ns

    cmds = commands(script, task)
    (train_argv,) = [a for k, a in cmds if k.endswith("train_ppo")]
    train = _parse(train_ppo_parser, train_argv, "train_ppo")
    g = vars(train)
    calib = [vars(_parse(build_parser("calibrate"), ["calibrate", *a], k)) for k, a in cmds if k.endswith("calibrate")]
    by_out = {c["out"]: c for c in calib}
    store, eval_store = g["infalign.store"], g["infalign.eval_store"] or g["infalign.store"]
    assert store in by_out and eval_store in by_out, "train/eval stores must be built by the script's calibrate steps"

    # Same prompts, template and sampling as the trainer: else store keys or the step-0 win rates would not match.
    for out, dataset, temperature in (
        (store, g["data.prompt_dataset"], g["rollout.temperature"]),
        (eval_store, g["eval.dataset"], g["eval.temperature"]),
    ):
        c = by_out[out]
        assert c["data.prompt_dataset"] == dataset
        assert c["actor.model_name_or_path"] == g["actor.model_name_or_path"]
        assert c["reward.model_name_or_path"] == g["reward.model_name_or_path"]
        for k in ("data.input_key", "data.apply_chat_template", "data.input_template", "data.max_len"):
            assert c[k] == g[k], (out, k)
        assert c["rollout.max_new_tokens"] == g["rollout.max_new_tokens"]
        assert float(c["rollout.temperature"]) == float(temperature), (out, "temperature")
    assert by_out[store]["data.max_samples"] == g["data.max_samples"]

    # Evaluation: N fits M and K; the best-checkpoint key is one the hook logs.
    ns = parse_ns(g["infalign.eval_n"], "--infalign.eval_n")
    assert max(ns) <= min(g["eval.n_samples_per_prompt"], by_out[eval_store]["k"])
    kind, n = g["infalign.inference"].split(":")
    assert g["ckpt.best_metric_key"] == f"infalign/{kind}_{n}" and int(n) in ns

    # Hybrid engine arithmetic upstream asserts at start-up.
    if g["train.colocate_all"]:
        gpus = g["actor.num_nodes"] * g["actor.num_gpus_per_node"]
        assert gpus == g["vllm.num_engines"] * g["vllm.tensor_parallel_size"]
        assert (g["ref.num_nodes"], g["ref.num_gpus_per_node"]) == (g["actor.num_nodes"], g["actor.num_gpus_per_node"])
    assert g["rollout.n_samples_per_prompt"] * g["rollout.batch_size"] // g["rollout.micro_batch_size"] >= (
        g["actor.num_nodes"] * g["actor.num_gpus_per_node"]
    )

    # t and the KL coefficient are the planner's answer for this inference procedure, KL budget, store K and
    # estimator (and the header says so): the coefficient is the converted one that gives the planned beta.
    key = (g["infalign.inference"], g["infalign.kl_budget"], by_out[store]["k"])
    key += (g["algo.advantage.estimator"], g["rollout.n_samples_per_prompt"])
    p = plan(*key)
    rec = p["recommended"]
    name, t = g["infalign.transform"].split(":t=")
    assert rec["transform"].split(":t=")[0] == name
    assert float(t) == pytest.approx(rec["t"], rel=0.02)
    assert float(g["algo.kl.init_coef"]) == pytest.approx(rec["kl_coef"], rel=0.01)
    header = script.read_text()
    assert "infalign " + " ".join(plan_argv(*key)) in header
    assert g["infalign.transform"] in header


def test_prepare_hh_prompts_parsing():
    mod = _prepare_parser()
    text = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour and water."
    assert mod.prompt_messages(text) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "how do I bake bread?"},
    ]
    assert mod.prompt_messages("\n\nAssistant: only an answer") is None
    rows = mod.unique_prompts([text, text.replace("Mix flour", "Buy"), "\n\nHuman: other\n\nAssistant: x"])
    assert [r["input"][-1]["content"] for r in rows] == ["how do I bake bread?", "other"]  # shared prompt once
    assert mod.unique_prompts([text, "\n\nHuman: other\n\nAssistant: x"], limit=1) == rows[:1]
