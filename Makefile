# The README's two commands: `make run` and `make test`. Each installs what is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STATE_DIR ?= /var/lib/sysgram
RUN_ARGS ?=

.PHONY: run test install system-deps venv lint typecheck bench install-service clean

run: install
	$(VENV)/bin/sysgram run --state-dir $(STATE_DIR) --alerts-jsonl $(STATE_DIR)/alerts.jsonl $(RUN_ARGS)

test: install
	bash scripts/test.sh

install: system-deps $(STAMP)

# apt packages: bcc (Debian's, not PyPI's), libseccomp's bindings, kernel headers. Idempotent.
system-deps:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $$(test -d /opt/wheels && echo --find-links /opt/wheels) 'torch==2.13.0'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[train,test]'
	@touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/sysgram bench

# Install the systemd unit (documented in README): the agent as a host service.
# The config may hold the webhook secret and the ingestion token: root only, also when it already exists.
install-service: install
	install -m 0644 deploy/sysgram.service /etc/systemd/system/sysgram.service
	install -d -m 0700 /etc/sysgram
	test -f /etc/sysgram/config.yaml || install -m 0600 deploy/config.yaml /etc/sysgram/config.yaml
	chmod 0600 /etc/sysgram/config.yaml
	sed -i "s#@PREFIX@#$(CURDIR)#g" /etc/systemd/system/sysgram.service
	systemctl daemon-reload
	@echo "now: systemctl enable --now sysgram"

clean:
	rm -rf $(VENV) .cache build *.egg-info
