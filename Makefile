# wasm-core: build, run in dev mode, test.
#
#   make dev     build everything, start wasmcored in dev mode on $(DEV_SOCKET) with state
#                in .dev/, and load the example plugins (Ctrl-C stops it)
#   make test    build everything and run every test (as root: the tests create users;
#                Extism's own runtime from PyPI is the reference of the Extism tests),
#                then every fuzz target for 10 s
#   make check   rustfmt and clippy, as CI runs them, and `cargo package` of the crates a
#                registry would get (wasmcore-proto, wasmcore-client)
#   make bench   the benchmarks (see docs/PERFORMANCE.md); make bench-guard: CI's short run
#   make fuzz    every fuzz target for FUZZ_SECONDS (30) each (nightly + cargo-fuzz)
#   make deb     build and check the .debs: wasm-core and python3-wasmcore (dpkg-buildpackage,
#                lintian; installs the build dependencies it lacks)
#   make rpm     build and check the .rpms: wasm-core and python3-wasmcore (rpmbuild, rpmlint)
#   make e2e     make deb, then the previous release's .deb installed, exercised, upgraded to
#                this one, removed and purged in a booted Debian 12 (systemd-nspawn)
#   make install install into DESTDIR/PREFIX (used by both package builds)

CARGO      ?= cargo
PREFIX     ?= /usr
DESTDIR    ?=
SYSCONFDIR ?= /etc
UNITDIR    ?= $(PREFIX)/lib/systemd/system
PROFILE    := release
BIN        := target/$(PROFILE)
DEV_SOCKET ?= /tmp/wasm-core.sock
PLUGINS    := uppercase transform hash counter wc linenum greet sort

.PHONY: all build plugins probe dev test check bench bench-guard fuzz docs install deb rpm e2e clean

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

# What the end-to-end tests run besides our binaries: systemd-socket-activate, setpriv,
# useradd/groupadd, mount, Debian's python3 as a client under other UIDs, and curl and
# promtool (prometheus) for the metrics exporter, tmux as the terminal of `top`, pytest
# for the Python client's tests, and socat as the README's example client.
TEST_DEBS := systemd util-linux passwd mount python3 curl prometheus tmux python3-pytest socat \
  docker-registry skopeo apache2-utils

test: build plugins probe
	packaging/ensure-packages.sh $(TEST_DEBS)
	tests/extism/setup.sh
	$(CARGO) test --$(PROFILE) --workspace
	$(MAKE) fuzz FUZZ_SECONDS=10

# The daemon with the escape probe (wasmcored/src/kinds/probe.rs: host calls that try what an
# escaped guest would), for the confinement tests only; never installed. The last build puts
# the shipped daemon back in place.
probe:
	$(CARGO) build --$(PROFILE) -p wasmcored --features escape-probe --bin wasmcored
	cp $(BIN)/wasmcored $(BIN)/wasmcored-escape-probe
	$(CARGO) build --$(PROFILE) -p wasmcored --bin wasmcored

# Where `make check` verifies the packaged crates.
PACKAGE_TARGET := target/package-check

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
# Cargo verifies wasmcore-client against the wasmcore-proto it just packaged, unpacked
# into CARGO_HOME and built in the target directory; it reuses what an earlier run of
# the same version left in either place, and ours change without a version bump: drop
# the unpacked copies, and verify in a target directory of its own, emptied first.
	rm -rf $${CARGO_HOME:-$$HOME/.cargo}/registry/src/-*/wasmcore-proto-* \
	  $${CARGO_HOME:-$$HOME/.cargo}/registry/src/-*/wasmcore-client-* \
	  $(PACKAGE_TARGET)
	$(CARGO) package --quiet --allow-dirty --target-dir $(PACKAGE_TARGET) \
	  -p wasmcore-proto -p wasmcore-client

bench: build plugins
	$(CARGO) bench -p wasmcored --bench exec
	$(CARGO) bench -p wasmcore-tests --bench restart
	tests/bench-socket.sh
	tests/bench-clients.py
	tests/bench-noisy.py
	tests/bench-workers.py

# A short socket benchmark that fails only on gross regressions of the ratios (CI): a ratio
# below its floor (docs/PERFORMANCE.md, "Regression guard") in two runs in a row.
bench-guard: build plugins
	tests/bench-socket.sh --duration-ms 200 --executions 0 --copies 0 --check || \
	  { echo "bench-guard: below a floor; measuring again"; \
	    tests/bench-socket.sh --duration-ms 200 --executions 0 --copies 0 --check; }

# The fuzz targets in tests/fuzz (docs/SECURITY.md). The committed corpus is read; new
# inputs go to tests/fuzz/target/corpus, crashes to tests/fuzz/artifacts. A longer run:
# make fuzz FUZZ_SECONDS=3600.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := request_decoder abi_host_calls
fuzz:
	rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	$(CARGO) +nightly fuzz --version >/dev/null 2>&1 || $(CARGO) +nightly install cargo-fuzz --version 0.13.2 --locked
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p tests/fuzz/target/corpus/$$t && \
	  $(CARGO) +nightly fuzz run --fuzz-dir tests/fuzz -O $$t tests/fuzz/target/corpus/$$t \
	    tests/fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; \
	done

# Installs what `make build plugins` produced; package builds call it with DESTDIR.
install:
	install -Dm755 $(BIN)/wasmcored $(DESTDIR)$(PREFIX)/bin/wasmcored
	install -Dm755 $(BIN)/wasmcorectl $(DESTDIR)$(PREFIX)/bin/wasmcorectl
	install -Dm755 $(BIN)/wasm-core-metrics $(DESTDIR)$(PREFIX)/bin/wasm-core-metrics
	for u in wasm-core.service wasm-core.socket wasm-core-metrics.service wasm-core-metrics.socket; do \
	  install -Dm644 systemd/$$u $(DESTDIR)$(UNITDIR)/$$u; done
	install -Dm644 systemd/wasm-core.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/wasm-core.conf
	install -Dm644 systemd/config.toml $(DESTDIR)$(SYSCONFDIR)/wasm-core/config.toml
	install -dm755 $(DESTDIR)$(SYSCONFDIR)/wasm-core/binaries.d
	install -Dm644 man/wasmcored.8 $(DESTDIR)$(PREFIX)/share/man/man8/wasmcored.8
	install -Dm644 man/wasm-core-metrics.8 $(DESTDIR)$(PREFIX)/share/man/man8/wasm-core-metrics.8
	install -Dm644 man/wasm-core.toml.5 $(DESTDIR)$(PREFIX)/share/man/man5/wasm-core.toml.5
	for f in man/wasmcorectl*.1; do install -Dm644 $$f $(DESTDIR)$(PREFIX)/share/man/man1/$$(basename $$f); done
	install -Dm644 packaging/completions/wasmcorectl.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/wasmcorectl
	install -Dm644 packaging/completions/_wasmcorectl $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_wasmcorectl
	install -Dm644 packaging/completions/wasmcorectl.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/wasmcorectl.fish
	for p in $(PLUGINS); do install -Dm644 plugins/dist/$$p.wasm $(DESTDIR)$(PREFIX)/share/wasm-core/plugins/$$p.wasm; done
	for d in README.md docs/*.md; do install -Dm644 $$d $(DESTDIR)$(PREFIX)/share/doc/wasm-core/$$(basename $$d); done

# Packages, built and checked (lintian / rpmlint, file lists, scriptlets).
deb:
	packaging/check-deb.sh

rpm:
	packaging/rpm/build.sh

# Build the .debs, install the previous release's in a Debian 12 root, boot it with
# systemd-nspawn, upgrade, remove, purge (root).
e2e: deb
	packaging/e2e/run.sh

docs:
	$(CARGO) run --$(PROFILE) -p wasmcore-tests --bin wasmcore-gen-docs

clean:
	$(CARGO) clean
	rm -rf plugins/target plugins/dist .dev
