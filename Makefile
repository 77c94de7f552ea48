# taskmill: the two commands of the README, and a few more.
.PHONY: demo cluster-demo test lint build services bench

# The demo: services up, release build, two workers, 10,000 posts over local HTTP.
demo:
	bash deploy/scripts/demo.sh

# The demo against a three-node RabbitMQ cluster, one node killed half-way.
cluster-demo:
	bash deploy/scripts/cluster-demo.sh

# The tests: services up, formatting and lints, then the whole suite against them.
test: services lint
	bash deploy/scripts/browser.sh
	bash deploy/scripts/test-tools.sh
	bash deploy/scripts/validate.sh
	cargo build --workspace --bins
	./target/debug/tmt-cleanup
	if command -v cargo-nextest >/dev/null; then \
		cargo nextest run --workspace && cargo test --workspace --doc; \
	else \
		timeout 1800 cargo test --workspace --no-fail-fast; \
	fi

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

build:
	cargo build --release --workspace --bins

services:
	bash deploy/scripts/services.sh

# The benchmark harness: release build, then every workload; writes docs/bench/.
bench: services
	cargo build --release --workspace --bins
	./target/release/bench
