#!/usr/bin/env bash
# InfAlign (CTRL) on Anthropic HH across several nodes, submitted to a running Ray cluster with `ray job submit`.
#   TASK=helpful  -> helpfulness, trained for Best-of-4 sampling (bon:4)
#   TASK=harmless -> harmlessness, trained for Worst-of-4 robustness (won:4)
#
# Hardware: 2 nodes x 8 GPUs (80 GB each, A100/H100) already joined in one Ray cluster (`ray start --head` on one,
#   `ray start --address=HEAD:6379` on the other; see hh_slurm.sbatch for doing it under Slurm). Hybrid engine over
#   the 16 GPUs: DeepSpeed actor (ZeRO-3), reference and reward model and 8 vLLM engines (tensor parallel 2) colocated.
# Models: base policy pi_ref = OpenRLHF/Llama-3-8b-sft-mixture (8B), reward = OpenRLHF/Llama-3-8b-rm-mixture (8B)
#   (for harmlessness, prefer a dedicated harmlessness RM: REWARD_MODEL=...; the same RM for calibration and RL).
# Software: every node runs a CUDA image with flash-attn 2.8.3 built; the job's runtime env installs this package
#   (pip: ["openrlhf-infalign[gpu]"], which pins openrlhf[vllm]==0.11.2) for the driver and every Ray worker.
# Storage: $SHARED must be the same shared filesystem path on all nodes (the trainer actor reads the prompt files
#   and writes checkpoints and infalign_eval.jsonl there). The reference stores are read by the driver only and reach
#   the trainer actor through Ray's object store.
#
# Transform t and KL coefficient per task, from the InfAlign planner:
#   $ infalign plan --inference bon:4 --kl-budget 1 --k 32 --algo.advantage.estimator reinforce_baseline --rollout.n_samples_per_prompt 4 --json
#     "recommended": {"transform": "exp:t=17.32", "beta": 0.2619, "win_rate": 0.9076, "kl_coef": 0.1965}
#   $ infalign plan --inference won:4 --kl-budget 0.5 --k 32 --algo.advantage.estimator reinforce_baseline --rollout.n_samples_per_prompt 4 --json
#     "recommended": {"transform": "negexp:t=9.676", "beta": 0.01406, "win_rate": 0.9387, "kl_coef": 0.01055}
#   kl_coef is --algo.kl.init_coef: beta * (n-1)/n under reinforce_baseline (its group mean includes the sample);
#   win rates are the theory at the RLHF optimum for that KL budget with K = 32 reference samples per prompt.
#
# DRY_RUN=1 prints every command instead of running it.
set -euo pipefail

TASK=${TASK:-helpful}
case "$TASK" in
    helpful)
        SUBSET=helpful-base; INFERENCE=bon:4; TRANSFORM=exp:t=17.32; KL_BUDGET=1; KL_COEF=0.1965
        BEST_METRIC=infalign/bon_4 ;;
    harmless)
        SUBSET=harmless-base; INFERENCE=won:4; TRANSFORM=negexp:t=9.676; KL_BUDGET=0.5; KL_COEF=0.01055
        BEST_METRIC=infalign/won_4 ;;
    *) echo "TASK must be helpful or harmless, got '$TASK'" >&2; exit 2 ;;
esac

RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
POLICY=${POLICY:-OpenRLHF/Llama-3-8b-sft-mixture}
REWARD_MODEL=${REWARD_MODEL:-OpenRLHF/Llama-3-8b-rm-mixture}
SHARED=${SHARED:-/mnt/shared/infalign}
DATA=$SHARED/data
REFS=$SHARED/refs/$TASK
RUN=$SHARED/runs/hh_${TASK}_${INFERENCE/:/}
K=${K:-32}
MAX_PROMPTS=${MAX_PROMPTS:-20000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNTIME_ENV='{"pip": ["openrlhf-infalign[gpu]"], "env_vars": {"NCCL_DEBUG": "WARN", "TOKENIZERS_PARALLELISM": "false"}}'

run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

# 1. Prompts, written to the shared filesystem (light CPU job: runs here).
run python "$HERE/prepare_hh_prompts.py" --subset "$SUBSET" --out "$DATA" --eval-size 500

# 2. Reference stores (Ray jobs: the vLLM engines spread over the cluster's 16 GPUs). Resumable.
run ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$RUNTIME_ENV" -- \
    infalign calibrate \
    --actor.model_name_or_path "$POLICY" \
    --reward.model_name_or_path "$REWARD_MODEL" \
    --data.prompt_dataset "$DATA/hh_${SUBSET}_train.jsonl" \
    --data.input_key input \
    --data.apply_chat_template \
    --data.max_samples "$MAX_PROMPTS" \
    --data.max_len 1536 \
    --rollout.temperature 1.0 \
    --rollout.max_new_tokens 512 \
    --vllm.num_engines 16 \
    --vllm.enable_prefix_caching \
    --k "$K" \
    --out "$REFS/train"

run ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$RUNTIME_ENV" -- \
    infalign calibrate \
    --actor.model_name_or_path "$POLICY" \
    --reward.model_name_or_path "$REWARD_MODEL" \
    --data.prompt_dataset "$DATA/hh_${SUBSET}_eval.jsonl" \
    --data.input_key input \
    --data.apply_chat_template \
    --data.max_len 1536 \
    --rollout.temperature 1.0 \
    --rollout.max_new_tokens 512 \
    --vllm.num_engines 16 \
    --vllm.enable_prefix_caching \
    --k "$K" \
    --out "$REFS/eval"

# 3. PPO on the CTRL reward over both nodes.
run ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$RUNTIME_ENV" -- \
    openrlhf train_ppo \
    --actor.num_nodes 2 --actor.num_gpus_per_node 8 \
    --ref.num_nodes 2 --ref.num_gpus_per_node 8 \
    --reward.num_nodes 2 --reward.num_gpus_per_node 8 \
    --vllm.num_engines 8 --vllm.tensor_parallel_size 2 \
    --vllm.gpu_memory_utilization 0.6 \
    --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
    --actor.model_name_or_path "$POLICY" \
    --reward.model_name_or_path "$REWARD_MODEL" \
    --data.prompt_dataset "$DATA/hh_${SUBSET}_train.jsonl" \
    --data.input_key input \
    --data.apply_chat_template \
    --data.max_samples "$MAX_PROMPTS" \
    --data.max_len 1536 \
    --rollout.max_new_tokens 512 \
    --rollout.temperature 1.0 \
    --rollout.batch_size 256 --rollout.micro_batch_size 8 --rollout.n_samples_per_prompt 4 \
    --train.batch_size 256 --train.micro_batch_size 4 \
    --train.max_epochs 1 --train.num_episodes 1 \
    --algo.advantage.estimator reinforce_baseline \
    --algo.kl.init_coef "$KL_COEF" --algo.kl.estimator k1 \
    --actor.adam.lr 5e-7 \
    --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
    --reward_wrapper infalign.ctrl \
    --infalign.store "$REFS/train" \
    --infalign.inference "$INFERENCE" \
    --infalign.transform "$TRANSFORM" \
    --infalign.kl_budget "$KL_BUDGET" \
    --eval.dataset "$DATA/hh_${SUBSET}_eval.jsonl" \
    --eval.steps 20 --eval.n_samples_per_prompt 8 --eval.temperature 1.0 \
    --infalign.eval_store "$REFS/eval" \
    --infalign.eval_n 1,2,4,8 \
    --ckpt.best_metric_key "$BEST_METRIC" \
    --ckpt.output_dir "$RUN" --ckpt.path "$RUN/ckpt" --ckpt.save_steps 50 --ckpt.save_hf \
    --logger.tensorboard_dir "$RUN/tensorboard"

# 4. Plots from $RUN/infalign_eval.jsonl (any machine that sees $SHARED).
run infalign report "$RUN"
