#!/usr/bin/env bash
# Build the .debs from this checkout (wasm-core and python3-wasmcore) and check them:
# lintian (no errors, no warnings), the file lists, the conffile, and the maintainer
# scripts. On a fresh machine it installs what the build needs (root then): dpkg-dev,
# lintian, and every Build-Depends of debian/control (debhelper, dh-python, the plugin
# toolchain) that dpkg-checkbuilddeps reports missing.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

"$top/packaging/ensure-packages.sh" dpkg-dev debhelper lintian fakeroot
# dpkg-checkbuilddeps names each missing Build-Depends; version constraints and
# alternatives are dropped (bookworm's own packages satisfy them).
missing=$(dpkg-checkbuilddeps 2>&1 | sed -n 's/.*Unmet build dependencies: //p' |
          sed -e 's/([^)]*)//g' -e 's/|[^ ]*//g' || true)
# shellcheck disable=SC2086
[ -z "$missing" ] || "$top/packaging/ensure-packages.sh" $missing

dpkg-buildpackage -us -uc -b >/tmp/wasm-core-deb-build.log 2>&1 || { tail -40 /tmp/wasm-core-deb-build.log; exit 1; }
version=$(dpkg-parsechangelog -S Version)
arch=$(dpkg --print-architecture)
deb="$top/../wasm-core_${version}_${arch}.deb"
pydeb="$top/../python3-wasmcore_${version}_all.deb"
fail() { echo "check-deb: $*" >&2; exit 1; }

# lintian: errors and warnings fail; info-level notes are shown.
out=$(lintian "$deb" "$pydeb" 2>&1 | grep -v 'running with root privileges' || true)
[ -z "$out" ] || echo "$out"
if grep -qE '^(E|W):' <<<"$out"; then fail "lintian reports errors or warnings"; fi

pyfiles=$(dpkg-deb -c "$pydeb" | awk '{print $6}')
for f in __init__.py client.py errors.py py.typed; do
  grep -qx "./usr/lib/python3/dist-packages/wasmcore/$f" <<<"$pyfiles" || fail "python3-wasmcore lacks wasmcore/$f"
done
grep -q '^./usr/lib/python3/dist-packages/wasmcore-.*\.dist-info/METADATA$' <<<"$pyfiles" || fail "python3-wasmcore lacks its dist-info"
dpkg-deb -f "$pydeb" Depends | grep -q 'python3' || fail "python3-wasmcore does not depend on python3"

files=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in ./usr/bin/wasmcored ./usr/bin/wasmcorectl ./usr/bin/wasm-core-metrics \
         ./lib/systemd/system/wasm-core.service ./lib/systemd/system/wasm-core.socket \
         ./lib/systemd/system/wasm-core-metrics.service ./lib/systemd/system/wasm-core-metrics.socket \
         ./usr/share/man/man8/wasm-core-metrics.8.gz \
         ./usr/lib/sysusers.d/wasm-core.conf ./etc/wasm-core/config.toml \
         ./usr/share/man/man8/wasmcored.8.gz ./usr/share/man/man1/wasmcorectl.1.gz \
         ./usr/share/man/man5/wasm-core.toml.5.gz \
         ./usr/share/bash-completion/completions/wasmcorectl \
         ./usr/share/zsh/vendor-completions/_wasmcorectl \
         ./usr/share/fish/vendor_completions.d/wasmcorectl.fish \
         ./usr/share/wasm-core/plugins/uppercase.wasm ./usr/share/wasm-core/plugins/linenum.wasm; do
  grep -qx "$f" <<<"$files" || fail "missing $f"
done

ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl"
grep -qx /etc/wasm-core/config.toml "$ctl/conffiles" || fail "the config is not a conffile"
grep -q 'systemd-sysusers.*wasm-core.conf' "$ctl/postinst" || fail "postinst does not create the user"
grep -q "deb-systemd-helper enable 'wasm-core.socket'" "$ctl/postinst" || fail "postinst does not enable the socket"
if grep -q "deb-systemd-helper enable 'wasm-core.service'" "$ctl/postinst" && \
   ! grep -q "was-enabled 'wasm-core.service'" "$ctl/postinst"; then
  fail "the service must be started by its socket, not enabled on its own"
fi
grep -q 'rm -rf /var/lib/wasm-core' "$ctl/postrm" || fail "purge does not remove /var/lib/wasm-core"
grep -q 'restart-after-upgrade' "$ctl/prerm" && grep -q 'start --no-block wasm-core.service' "$ctl/postinst" || \
  fail "an upgrade does not start a service that was running again"
# Enabled again on upgrade only if the admin had enabled them (debhelper's --no-enable).
for u in wasm-core-metrics.socket wasm-core-metrics.service; do
  if grep -q "deb-systemd-helper enable '$u'" "$ctl/postinst" && \
     ! grep -q "was-enabled '$u'" "$ctl/postinst"; then
    fail "$u must ship disabled"
  fi
done
echo "check-deb: $deb ok ($(du -h "$deb" | cut -f1))"
echo "check-deb: $pydeb ok ($(du -h "$pydeb" | cut -f1))"
