# `make demo`: set up .venv if needed, then run the main job on the embedded default (tiny models on CPU).
# `make study`: the InfAlign study (docs/study.md), resumable; writes study_out/.
# `make test`: set up .venv if needed, then run the test suite (what .ci/run calls).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo study test test-fast bench clean

$(VENV)/.setup-done: pyproject.toml scripts/setup_cpu.sh
	bash scripts/setup_cpu.sh

setup: $(VENV)/.setup-done

demo: setup
	$(PY) -m openrlhf_infalign.demo.pipeline --out demo_out

# `make study`: raw reward, calibration, CTRL, log-CDF and the direct objective with the noise control, 9 arms x 3
# seeds through the real loop, evaluated exactly (~80 min on 2 cores; not in `make test`; docs/study.md).
study: setup
	$(PY) -m openrlhf_infalign.studies.study --out study_out

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not e2e and not multinode and not slow"

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
