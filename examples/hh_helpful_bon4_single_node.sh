#!/usr/bin/env bash
# InfAlign (CTRL) on Anthropic HH helpfulness, trained for Best-of-4 sampling (bon:4): calibrate, then train.
#
# Hardware: ONE node with 8 GPUs (80 GB each, A100/H100). Hybrid engine: the DeepSpeed actor (ZeRO-3), the reference
#   model, the reward model and 4 vLLM engines (tensor parallel 2) are colocated on the same 8 GPUs and take turns
#   (--train.colocate_all, --vllm.enable_sleep, --ds.enable_sleep). No critic (REINFORCE with a per-prompt baseline).
# Models: base policy pi_ref = OpenRLHF/Llama-3-8b-sft-mixture (8B), reward = OpenRLHF/Llama-3-8b-rm-mixture (8B).
# Data: Anthropic/hh-rlhf helpful-base: all train prompts for RL, 500 test prompts for evaluation.
#
# Transform t and KL coefficient: from the InfAlign planner for Best-of-4 at a KL budget of 1 nat, for this run's
# store (K = 32 reference samples per prompt) and estimator (reinforce_baseline, 4 samples per prompt):
#   $ infalign plan --inference bon:4 --kl-budget 1 --k 32 --algo.advantage.estimator reinforce_baseline --rollout.n_samples_per_prompt 4 --json
#   "recommended": {"transform": "exp:t=17.32", "beta": 0.2619, "win_rate": 0.9076, "kl_coef": 0.1965}
#   "optimal": {"win_rate": 0.9067}, baselines: identity 0.8692, log 0.8559
#   -> --infalign.transform exp:t=17.32 --algo.kl.init_coef 0.1965: reinforce_baseline's group mean includes the
#      sample, so the coefficient is beta * (n-1)/n; beta is that of the normalised transform in [0, 1]. Win rates
#      are the theory at the RLHF optimum with K = 32 (what a perfectly optimised run would reach). Training sets
#      the planned coefficient itself when --algo.kl.init_coef is not given.
#
# Steps: 1. prompts  2. reference stores, K = 32 base-policy samples per prompt scored by the RM, for the training
#   prompts and for the eval prompts (resumable: re-run after a kill)  3. PPO on the CTRL reward, with Best-of-N win
#   rates vs the base policy at step 0 and every 20 steps (eval/infalign/bon_4 ...; best checkpoint on bon_4)
#   4. plots. Eval sampling (temperature 1.0, 512 new tokens) matches calibration, so step 0 reads ~0.5.
# DRY_RUN=1 prints every command instead of running it.
set -euo pipefail

POLICY=${POLICY:-OpenRLHF/Llama-3-8b-sft-mixture}
REWARD_MODEL=${REWARD_MODEL:-OpenRLHF/Llama-3-8b-rm-mixture}
WORK=${WORK:-$PWD/infalign_hh_helpful}
DATA=$WORK/data
REFS=$WORK/refs
RUN=$WORK/run_bon4
K=${K:-32}
MAX_PROMPTS=${MAX_PROMPTS:-20000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

# 1. Prompts (chat messages; rendered with the policy's chat template by both jobs below).
run python "$HERE/prepare_hh_prompts.py" --subset helpful-base --out "$DATA" --eval-size 500

# 2. Reference stores: same prompt, template and sampling flags as training / evaluation, so keys match.
run infalign calibrate \
    --actor.model_name_or_path "$POLICY" \
    --reward.model_name_or_path "$REWARD_MODEL" \
    --data.prompt_dataset "$DATA/hh_helpful-base_train.jsonl" \
    --data.input_key input \
    --data.apply_chat_template \
    --data.max_samples "$MAX_PROMPTS" \
    --data.max_len 1536 \
    --rollout.temperature 1.0 \
    --rollout.max_new_tokens 512 \
    --vllm.num_engines 8 \
    --vllm.enable_prefix_caching \
    --k "$K" \
    --out "$REFS/train"

run infalign calibrate \
    --actor.model_name_or_path "$POLICY" \
    --reward.model_name_or_path "$REWARD_MODEL" \
    --data.prompt_dataset "$DATA/hh_helpful-base_eval.jsonl" \
    --data.input_key input \
    --data.apply_chat_template \
    --data.max_len 1536 \
    --rollout.temperature 1.0 \
    --rollout.max_new_tokens 512 \
    --vllm.num_engines 8 \
    --vllm.enable_prefix_caching \
    --k "$K" \
    --out "$REFS/eval"

# 3. PPO (REINFORCE baseline, 4 samples per prompt) on R = Phi(C(x, y)), Phi = exp:t=17.32 normalised.
run openrlhf train_ppo \
    --actor.num_nodes 1 --actor.num_gpus_per_node 8 \
    --ref.num_nodes 1 --ref.num_gpus_per_node 8 \
    --reward.num_nodes 1 --reward.num_gpus_per_node 8 \
    --vllm.num_engines 4 --vllm.tensor_parallel_size 2 \
    --vllm.gpu_memory_utilization 0.6 \
    --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
    --actor.model_name_or_path "$POLICY" \
    --reward.model_name_or_path "$REWARD_MODEL" \
    --data.prompt_dataset "$DATA/hh_helpful-base_train.jsonl" \
    --data.input_key input \
    --data.apply_chat_template \
    --data.max_samples "$MAX_PROMPTS" \
    --data.max_len 1536 \
    --rollout.max_new_tokens 512 \
    --rollout.temperature 1.0 \
    --rollout.batch_size 128 --rollout.micro_batch_size 8 --rollout.n_samples_per_prompt 4 \
    --train.batch_size 128 --train.micro_batch_size 4 \
    --train.max_epochs 1 --train.num_episodes 1 \
    --algo.advantage.estimator reinforce_baseline \
    --algo.kl.init_coef 0.1965 --algo.kl.estimator k1 \
    --actor.adam.lr 5e-7 \
    --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
    --reward_wrapper infalign.ctrl \
    --infalign.store "$REFS/train" \
    --infalign.inference bon:4 \
    --infalign.transform exp:t=17.32 \
    --infalign.kl_budget 1 \
    --eval.dataset "$DATA/hh_helpful-base_eval.jsonl" \
    --eval.steps 20 --eval.n_samples_per_prompt 8 --eval.temperature 1.0 \
    --infalign.eval_store "$REFS/eval" \
    --infalign.eval_n 1,2,4,8 \
    --ckpt.best_metric_key infalign/bon_4 \
    --ckpt.output_dir "$RUN" --ckpt.path "$RUN/ckpt" --ckpt.save_steps 50 --ckpt.save_hf \
    --logger.tensorboard_dir "$RUN/tensorboard"

# 4. Win rate vs N, and BoN_4 win rate vs KL over the theory frontier (PNG + summary.md in $RUN/infalign_report).
run infalign report "$RUN"
