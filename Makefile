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

# `make study`: raw reward vs calibration vs CTRL, 5 arms x 3 seeds on the same CPU path (~80-110 min; not in `make test`).
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
