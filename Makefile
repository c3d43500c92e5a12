# The two commands a newcomer needs (see README.md):
#   make demo   run a real deployment on loopback and stream speech through it
#   make test   run the whole test suite
# Both run scripts/setup.sh first, which installs what is missing.

CARGO ?= cargo

.PHONY: setup demo test lint

setup:
	./scripts/setup.sh

demo: setup
	$(CARGO) build --bins
	./target/debug/earshot demo

# The failover tests run the built earshot-regional binary, and `cargo test`
# builds only the tested package's own binaries: build them all first.
test: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --all-targets

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
