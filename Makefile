# The two commands a newcomer needs (see README.md):
#   make demo   run a real deployment on loopback and stream speech through it
#   make test   run the whole test suite
# Both run scripts/setup.sh first, which installs what is missing.

CARGO ?= cargo

.PHONY: setup demo test lint sans-io

setup:
	./scripts/setup.sh

demo: setup
	$(CARGO) build --bins
	./target/debug/earshot demo

# The failover tests run the built earshot-regional binary, and `cargo test`
# builds only the tested package's own binaries: build them all first.
test: setup sans-io
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --all-targets

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The codecs stay sans IO: earshot-proto may not depend on an async runtime.
sans-io:
	@if $(CARGO) tree -p earshot-proto -e normal --prefix none | grep -E '^(tokio|mio|async-std|smol|futures-io) '; then \
		echo "earshot-proto must not depend on an async runtime (above): keep IO in earshot-common"; exit 1; fi
