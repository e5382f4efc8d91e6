# Two commands for a newcomer: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench system-tools protos

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and alone, pinned: on our machines 2.13.0 is a local CPU wheel.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/vae-serve

# Tools the integration tests use from Debian: Prometheus (with promtool) and wrk. Installed when
# missing and possible (root with apt-get); otherwise the tests that need them skip and say why.
system-tools:
	@missing=""; for t in prometheus promtool wrk h2load; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian packages for:$$missing"; \
			apt-get update -qq >/dev/null && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus wrk nghttp2-client >/dev/null \
			|| echo "could not install prometheus/wrk/h2load: their tests will skip"; \
		else echo "prometheus/wrk/h2load missing and not installable here (needs root and apt-get): their tests will skip"; fi; \
	fi

test: setup system-tools
	$(BIN)/python -m pytest

# The gRPC messages: service/protos/*.proto compiled into the descriptor set the service loads
# (tests/test_grpc.py fails when it is out of date).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -Iservice/protos --include_imports \
		--descriptor_set_out=service/protos/inference.binpb \
		service/protos/open_inference_grpc.proto service/protos/triton_extensions.proto

lint: setup
	$(BIN)/ruff check training service bench vaeclient tests
	$(BIN)/mypy training service bench vaeclient

bench: setup system-tools
	$(BIN)/vae-bench
