# mailbroker — the verbs people expect. Every target creates what it needs by itself.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
# The Lambda runtime is python3.13: build the venv on it where it exists, else on python3.
PY313 := $(firstword $(wildcard $(PYENV_ROOT)/versions/3.13*/bin/python3.13) $(shell command -v python3.13 2>/dev/null))
PYTHON_BOOT ?= $(if $(PY313),$(PY313),python3)
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
SAM := $(TOOLS)/sam/bin/sam
CHECKOV := $(TOOLS)/checkov/bin/checkov
PIP_FLAGS := --quiet --disable-pip-version-check
# Quiet pip's notes about optional local mirrors; real errors still fail the target.
PIP_FILTER := 2> >(grep -v "^WARNING: Location" >&2)

.PHONY: help venv tools run sandbox test test-long lint fmt typecheck cfn build deploy bench bench-smoke clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -m pip install $(PIP_FLAGS) --upgrade pip $(PIP_FILTER)
	@$(PY) -m pip install $(PIP_FLAGS) -e ".[dev]" $(PIP_FILTER)
	@touch $@

venv: $(VENV)/.installed ## create .venv with the package and dev tools

$(SAM):
	@python3 -m venv $(TOOLS)/sam
	@$(TOOLS)/sam/bin/pip install $(PIP_FLAGS) aws-sam-cli $(PIP_FILTER)

$(CHECKOV):
	@python3 -m venv $(TOOLS)/checkov
	@$(TOOLS)/checkov/bin/pip install $(PIP_FLAGS) checkov $(PIP_FILTER)

tools: $(SAM) $(CHECKOV) ## aws-sam-cli and checkov, each in its own venv (their pins clash)

run: venv ## the whole path in the local sandbox: tokens, queue, SMTP, keeper — then stop
	@$(PY) -m mailbroker_sandbox.run

sandbox: venv ## keep the local sandbox up, HTTP API on a loopback port
	@$(VENV)/bin/mailbroker local

lint: venv ## ruff lint + format check
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

fmt: venv ## apply ruff formatting and safe fixes
	@$(VENV)/bin/ruff check --fix .
	@$(VENV)/bin/ruff format .

typecheck: venv ## mypy over the package
	@$(VENV)/bin/mypy

cfn: venv tools ## cfn-lint, sam validate --lint (offline) and checkov on template.yaml
	@$(VENV)/bin/cfn-lint template.yaml
	@AWS_DEFAULT_REGION=us-east-1 SAM_CLI_TELEMETRY=0 $(SAM) validate --lint --template template.yaml
	@$(CHECKOV) --quiet --compact --skip-download --framework cloudformation --file template.yaml

test: lint typecheck cfn ## lint, types, template checks and the whole pytest suite (servers start and stop themselves)
	@$(PY) -m pytest -n 2 --dist loadgroup

test-long: venv ## the whole suite plus the long runs: 10,000 inputs per property, the 1,000-message load
	@$(PY) -m pytest -n 2 --dist loadgroup --long

build: tools ## sam build for python3.13 / arm64
	@PATH=$(dir $(PY313)):$$PATH SAM_CLI_TELEMETRY=0 $(SAM) build

deploy: build ## sam deploy (first time: sam deploy --guided)
	@SAM_CLI_TELEMETRY=0 $(SAM) deploy

bench: venv ## the benchmark table against baselines measured in the same run
	@$(PY) -m bench

bench-smoke: venv ## a short run of every benchmark (under a minute), as CI does
	@$(PY) -m bench --smoke

clean: ## remove venvs, build output and caches
	rm -rf $(VENV) $(TOOLS) .aws-sam .pytest_cache .mypy_cache .ruff_cache .hypothesis
