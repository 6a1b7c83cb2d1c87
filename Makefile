# The README's two commands: `make run` (the whole system with example pipelines) and
# `make test` (the whole suite). Both install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
VAR_DIR ?= var
export VAR_DIR
ADMIN_USER ?= admin
ADMIN_PASSWORD ?= admin

.PHONY: install prepare run test lint chromium socat bench faults lock demo clean

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .  # the cictl command
	touch $@

install: $(BIN)/.installed

# Prepare a stack for deploy/Procfile, for the DATABASE_URL, CELERY_BROKER_URL and VAR_DIR
# of the environment: create the database if missing, migrate, collect the static files,
# create the admin user (printing its API token), load examples/*.yaml. `run` and
# tests/integration/test_stack.py both use it, so the test prepares its stack as `run` does.
prepare: install
	$(BIN)/python manage.py checkservices --create-database
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput -v0
	$(BIN)/python manage.py ensureadmin --username "$(ADMIN_USER)" --password "$(ADMIN_PASSWORD)"
	for f in examples/*.yaml; do \
		$(BIN)/python manage.py loadpipeline "$$(basename $$f .yaml)" "$$f" || exit 1; done
	rm -rf "$(VAR_DIR)/metrics" && mkdir -p "$(VAR_DIR)/metrics"  # multiprocess metrics of the last run

# Prepare, then start web, controller, beat and two agents (deploy/Procfile). Run as root, the
# agents run their steps as `nobody`, in workspaces under /var/tmp, which that user reaches
# wherever the checkout is (README: What a step can reach).
ifeq ($(shell id -u),0)
run: export AGENT_STEP_USER ?= nobody
run: export AGENT_WORKSPACE_ROOT ?= /var/tmp/ciproject-$(PORT)/workspaces
endif
# web, as the agents reach it for artifacts (honcho gives each process a PORT of its own).
run: export AGENT_SERVER_URL ?= http://127.0.0.1:$(PORT)
run: prepare
	@echo "ciproject: http://127.0.0.1:$(PORT)/admin/ (user $(ADMIN_USER), password $(ADMIN_PASSWORD))"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/honcho -d . -f deploy/Procfile start --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the import contracts in pyproject.toml: dependencies run one way

# The browser tests (tests/browser) drive Debian's Chromium; nothing downloads a browser.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium; }

# The network fault tests relay the machine's RabbitMQ (loopback only) to their test hosts.
socat:
	@command -v socat >/dev/null || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends socat; }

# In parallel (pytest-xdist): each worker has its own test database, Redis database, VAR_DIR
# and real workers; the fault stack's tests keep to one worker (tests/faults/conftest.py).
TEST_WORKERS ?= 2
test: lint chromium socat
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

bench: install
	$(BIN)/pytest -o addopts="-p no:cacheprovider" tests/bench -s -q

# The fault suite with the soak (tests/faults/soak: 1,000 builds, minutes; `make test` skips
# it). SOAK_BUILDS=100 runs a shorter soak, SOAK_SEED=N repeats a mix.
faults: install socat
	$(BIN)/pytest -o addopts="-p no:cacheprovider" tests/faults --ignore=tests/faults/soak -q
	$(BIN)/pytest -o addopts="-p no:cacheprovider" tests/faults/soak -s -q  # -s: its figures

# Re-pin every dependency after editing pyproject.toml.
lock:
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --extra dev --strip-extras --no-emit-index-url \
		--no-emit-find-links -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) var
