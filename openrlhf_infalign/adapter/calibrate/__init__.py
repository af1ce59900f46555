"""`infalign calibrate` as a library: build the reference reward store from the training prompts and reward source.

``settings`` (every setting once, the CLI generated from it), ``prompts`` (OpenRLHF's dataset code, one row per
prompt key), ``generate`` (vLLM / HF samples), ``score`` (the reward sources), ``shards`` (the resumable work dir)
and ``job`` (the phases of a run).
"""

from .job import FAIL_AFTER_ENV, WorkPlan, plan_work, run_calibration
from .prompts import load_prompts, load_tokenizer, unique_prompts
from .settings import CalibrateSettings, CalibrationError, add_arguments, settings_from_args

__all__ = [
    "CalibrateSettings",
    "CalibrationError",
    "FAIL_AFTER_ENV",
    "WorkPlan",
    "add_arguments",
    "load_prompts",
    "load_tokenizer",
    "plan_work",
    "run_calibration",
    "settings_from_args",
    "unique_prompts",
]
