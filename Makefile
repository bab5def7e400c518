# `make run` and `make test` set up .venv/ on first use (later runs install nothing) and then
# start the server or run the test suite.
PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
PIP := $(VENV_PYTHON) -m pip install --disable-pip-version-check -q
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
BROWSER_STAMP := $(VENV)/.browser-installed
NGINX_STAMP := $(VENV)/.nginx-installed
# A current transformers in a folder of its own: the tests' independent reference for the model
# families' math (tests/reference/build_families.py). Nothing else imports it.
REFERENCE_DIR := .reference/transformers-4.57.6
REFERENCE_STAMP := $(REFERENCE_DIR)/.installed
# An agent's command-line client that tests/test_agent_cli.py runs against the server: OpenAI's
# Codex CLI (its platform binary comes as a package too), pinned.
AGENT_CLI_DIR := $(VENV)/agent-cli
CODEX_VERSION := 0.171.0
AGENT_CLI_STAMP := $(AGENT_CLI_DIR)/.codex-$(CODEX_VERSION)
# Root installs system packages directly (as CI does); anyone else through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: run test bench setup clean-venv

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# petals is installed without its dependencies: its metadata pins a hivemind release that
# cannot be built offline; requirements.txt holds the set it really runs on (see swarm/compat.py).
$(RUNTIME_STAMP): requirements.txt requirements-petals.txt constraints.txt | $(VENV_PYTHON)
	$(PIP) -r requirements.txt -c constraints.txt
	$(PIP) --no-deps -r requirements-petals.txt
	touch $@

$(TEST_STAMP): $(RUNTIME_STAMP) requirements-test.txt
	$(PIP) -r requirements-test.txt -c constraints.txt
	touch $@

# The browser tests drive Debian's Chromium and its driver; a browser downloaded by a Python
# package at install time cannot be fetched here. Installed only when missing.
$(BROWSER_STAMP): | $(VENV_PYTHON)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; }
	touch $@

# The reverse-proxy test runs a real nginx in front of the server. Debian installs it in
# /usr/sbin, which is not on every user's PATH. Installed only when missing.
$(NGINX_STAMP): | $(VENV_PYTHON)
	PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v nginx >/dev/null || \
		{ $(SUDO) apt-get update && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx; }
	touch $@

# Node.js and npm install it; Debian's are installed when missing.
$(AGENT_CLI_STAMP): | $(VENV_PYTHON)
	command -v npm >/dev/null || \
		{ $(SUDO) apt-get update && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm; }
	npm install --prefix $(AGENT_CLI_DIR) --no-audit --no-fund --loglevel=error @openai/codex@$(CODEX_VERSION)
	touch $@

$(REFERENCE_STAMP): | $(RUNTIME_STAMP)
	$(PIP) --target $(REFERENCE_DIR) transformers==4.57.6
	touch $@

setup: $(RUNTIME_STAMP)

run: $(RUNTIME_STAMP)
	$(VENV_PYTHON) server.py $(ARGS)

test: $(TEST_STAMP) $(BROWSER_STAMP) $(NGINX_STAMP) $(REFERENCE_STAMP) $(AGENT_CLI_STAMP)
	$(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(VENV_PYTHON) bench/swarm_vs_local.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
