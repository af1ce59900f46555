"""Reading OpenRLHF's console output in the demo: per-step metrics, evaluation durations, condensed console lines."""

from openrlhf_infalign.runs import trainer_log


def test_step_and_eval_lines_are_parsed_and_condensed():
    lines = [
        (1.0, "(InfAlignPPOTrainer pid=1) INFO ⏰ Evaluation start time: 2026-01-01 00:00:00"),
        (3.5, "✨ Evaluation completed in 0:00:02, global_step 0, eval_metrics: {'infalign/bon_4': 0.5, "
              "'infalign/bon_4_stderr': 0.03, 'infalign/kl': 0.0}"),  # fmt: skip
        (4.0, "INFO ppo_trainer.py:551] ✨ Global step 1: {'kl': 0.0, 'vllm_kl': 0.001, 'timing/step_total': 0.5, "
              "'infalign/calibrated': 0.52, 'x': nan}"),  # fmt: skip
        (4.2, "unrelated line"),
    ]
    assert [trainer_log.keep(line) for _, line in lines] == [True, True, True, False]
    parsed = trainer_log.parse_step_logs(lines)
    assert parsed["evals"] == [{"step": 0, "seconds": 2.5, "t": 3.5}]
    assert len(parsed["steps"]) == 1 and parsed["steps"][0]["metrics"]["infalign/calibrated"] == 0.52
    assert parsed["steps"][0]["metrics"]["x"] != parsed["steps"][0]["metrics"]["x"]  # nan survives
    assert "calibrated 0.520" in trainer_log.format_train_line(lines[2][1])
    assert "bon 4 0.500±0.030" in trainer_log.format_train_line(lines[1][1])
    assert trainer_log.format_train_line(lines[3][1]) is None
