# Set-up and entry points. Every step installs what is missing and reuses what is there.
SHELL := /bin/bash
QUAD := $(or $(CARGO_TARGET_DIR),target)/release/quad
JOB ?= dataflows/demo.toml
WORKERS ?= 2

.PHONY: demo warmup test torch assets chromium build corpus bench clean gpu-bundle

# The main job on the embedded default: demo corpus, proxy warm-up (once), the full Quad loop
# on the CPU, and the report.
demo: build assets
	$(QUAD) corpus demo $(JOB)
	test -f data/demo/proxy/model.safetensors || $(QUAD) warmup $(JOB)
	$(QUAD) run $(JOB) -w $(WORKERS)
	$(QUAD) report $(JOB)

# Everything CI runs.
test: torch assets chromium
	cargo build --release
	cargo test --release

torch:
	bash scripts/setup-torch.sh

# Headless browser for the report test (tests/report.rs).
chromium:
	bash scripts/setup-chromium.sh

assets:
	bash scripts/fetch-assets.sh

build: torch
	cargo build --release

bench: build assets
	cargo bench --bench ingest

# The GPU check's folder (README, "Measuring on a GPU"): copy dist/gpu to the GPU machine and
# run gpu-check.sh there.
gpu-bundle: build assets
	rm -rf dist/gpu
	$(QUAD) gpu-check bundle dist/gpu

clean:
	rm -rf out data/demo
