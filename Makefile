# wasm-core: build, run in dev mode, test.
#
#   make dev     build everything, start wasmcored in dev mode on $(DEV_SOCKET) with state
#                in .dev/, and load the example plugins (Ctrl-C stops it)
#   make test    build everything and run every test (as root: the tests create users)
#   make check   rustfmt and clippy, as CI runs them
#   make bench   the benchmarks (see docs/PERFORMANCE.md)

CARGO      ?= cargo
PROFILE    := release
BIN        := target/$(PROFILE)
DEV_SOCKET ?= /tmp/wasm-core.sock
PLUGINS    := uppercase transform hash counter wc linenum

.PHONY: all build plugins dev test check bench clean

all: build plugins

build:
	$(CARGO) build --$(PROFILE) --workspace --all-targets

plugins:
	plugins/build.sh

dev: build plugins
	@mkdir -p .dev/state
	@$(BIN)/wasmcored --listen $(DEV_SOCKET) --state-dir .dev/state & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid' INT TERM; \
	for i in $$(seq 400); do [ -S $(DEV_SOCKET) ] && break; kill -0 $$pid 2>/dev/null || exit 1; sleep 0.05; done; \
	for p in $(PLUGINS); do \
	  $(BIN)/wasmcorectl --socket $(DEV_SOCKET) info $$p >/dev/null 2>&1 || \
	    $(BIN)/wasmcorectl --socket $(DEV_SOCKET) load plugins/dist/$$p.wasm --name $$p >/dev/null; \
	done; \
	echo "wasm-core is running on $(DEV_SOCKET) with the example plugins: $(PLUGINS)"; \
	echo "try: $(BIN)/wasmcorectl execute uppercase --input 'hello world'   (Ctrl-C stops the daemon)"; \
	wait $$pid

test: build plugins
	$(CARGO) test --$(PROFILE) --workspace

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: build plugins
	$(CARGO) bench -p wasmcored --bench exec
	$(CARGO) bench -p wasmcore-tests --bench restart
	@echo "socket benchmark: start the daemon (make dev) and run"
	@echo "  $(BIN)/wasmcorectl bench --binary uppercase"

clean:
	$(CARGO) clean
	rm -rf plugins/target plugins/dist .dev
