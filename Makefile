# Two commands on a fresh machine:   make demo   (the job end to end, local, tiny model, no GPU)
#                                    make test   (the test suite; what .ci/run calls)
#                                    make test-fast (the suite without the tests marked slow)
VENV ?= .venv
PY := $(VENV)/bin/python
# Machines of this workplace keep a CPU torch wheel there; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

# The suite on this many pytest-xdist workers (tests/conftest.py: expensive modules stay on one worker, the
# slow tests start first: --no-loadscope-reorder, or xdist hands out the modules with most tests first and the
# rehearsal ran last, alone); most tests wait on subprocesses, so 3 keep 2 cores busy from start to end (the run
# is CPU-bound: docs/development.md). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder)

.PHONY: demo test test-fast rehearse venv sysdeps lock-check clean

# Each step says what it does and how long it usually takes. Measured on 2 cores: ~8 min for a fresh clone
# (issue #30), 20.5 min with the cores shared by other test runs and 115 of ~190 packages downloaded.
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	@echo "==> [1/4] creating the virtual environment $(VENV) (seconds)"
	python3 -m venv $(VENV)
	@echo "==> [2/4] upgrading pip (seconds)"
	$(PY) -m pip install -q --upgrade pip
	@echo "==> [3/4] installing requirements/dev.txt: torch (CPU), transformers, SkyPilot and ~190 more packages;"
	@echo "          on 2 cores this takes about 8-20 minutes, less with more cores (each package is listed below)"
	$(PY) -m pip install --progress-bar on $(FIND_LINKS) -r requirements/dev.txt
	@echo "==> [4/4] installing socrates-launch itself (editable; seconds)"
	$(PY) -m pip install -q --no-deps -e .
	touch $@
	@echo "==> done: $(VENV)/bin/socrates-launch (or \`source $(VENV)/bin/activate\`, then socrates-launch)"

venv: $(VENV)/.installed

# rsync (SkyPilot's file sync) and openssh-server (the SSH backend's tests); installed when root.
sysdeps:
	@missing=""; command -v rsync >/dev/null || missing="$$missing rsync"; \
	 command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	 if [ -n "$$missing" ]; then \
	   if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	   else echo "note: missing$$missing; tests that need them will skip"; fi; fi

demo: venv
	$(VENV)/bin/socrates-launch up --infra local --config configs/smoke.yaml --yes

# pytest exits 5 when it collects no test: that is a failure here too, said plainly.
test: venv sysdeps
	@$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	 if [ $$rc = 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

# The same suite without the tests marked `slow` (real training, torchrun, the real smoke job end to end).
test-fast: venv sysdeps
	@$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	 if [ $$rc = 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

# The cloud machine rehearsed (tests/test_rehearsal.py; also in `make test`): the task `up --dryrun` renders,
# run the way SkyPilot runs it on simulated fresh nodes, the real lock installed from the package index.
rehearse: venv sysdeps
	@$(PY) -m pytest -q tests/test_rehearsal.py $(PYTEST_ARGS); rc=$$?; \
	 if [ $$rc = 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
