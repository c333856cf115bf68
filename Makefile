# Two commands that work on a fresh machine: `make demo` and `make test`.
# `make test-latest` runs the suite again on the newest tested releases (requirements-latest.txt).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST_VENV ?= .venv-latest
LPY := $(LATEST_VENV)/bin/python
LATEST_STAMP := $(LATEST_VENV)/.installed
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRITON_INTERPRET=1
# what test-latest runs: the whole suite
LATEST_TESTS ?= tests

.PHONY: demo test test-latest test-fast venv venv-latest clean

$(STAMP): requirements-dev.txt setup.cfg setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	DS_BUILD_OPS=0 $(VPY) -m pip install -q deepspeed==0.19.8
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# the newest tested releases; requirements-latest.txt pins deepspeed itself
$(LATEST_STAMP): requirements-latest.txt setup.cfg setup.py
	test -x $(LPY) || $(PY) -m venv $(LATEST_VENV)
	$(LPY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(LPY) -m pip install -q -r requirements-latest.txt
	$(LPY) -m pip install -q --no-deps -e .
	touch $(LATEST_STAMP)

venv: $(STAMP)

venv-latest: $(LATEST_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 $(VPY) -m hyclora.demo

test: $(STAMP)
	$(TEST_ENV) $(VPY) -m pytest -q -n 2 --durations=15 tests

test-latest: $(LATEST_STAMP)
	$(TEST_ENV) $(LPY) -m pytest -q -n 2 --durations=15 $(LATEST_TESTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build dist *.egg-info
