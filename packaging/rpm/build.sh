#!/usr/bin/env bash
# Build the RPM from this checkout (Debian's rpm package works), run rpmlint, and check the
# file list and scriptlets. Prints the path of the built package.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
"$top/packaging/ensure-packages.sh" rpm rpmlint python3-build python3-setuptools python3-wheel
out="$top/packaging/rpm/build"
rm -rf "$out"
mkdir -p "$out"
rpmbuild -bb "$top/packaging/rpm/wasm-core.spec" \
  --define "_topdir $out" --define "_sourcedir $top" \
  >"$out/rpmbuild.log" 2>&1 || { tail -40 "$out/rpmbuild.log"; exit 1; }
rpm=$(find "$out/RPMS" -name 'wasm-core-*.rpm' | head -n 1)
pyrpm=$(find "$out/RPMS" -name 'python3-wasmcore-*.noarch.rpm' | head -n 1)
fail() { echo "check-rpm: $*" >&2; exit 1; }
[ -n "$pyrpm" ] || fail "no python3-wasmcore package"

lint=$(rpmlint -c "$top/packaging/rpm/rpmlint.toml" "$rpm" "$pyrpm" 2>&1 || true)
echo "$lint" | tail -n 20
grep -qE '[0-9]+ errors' <<<"$lint" || fail "unexpected rpmlint output"
grep -qE '(^| )0 errors' <<<"$lint" || fail "rpmlint reports errors"

files=$(rpm -qlp "$rpm")
for f in /usr/bin/wasmcored /usr/bin/wasmcorectl /usr/lib/systemd/system/wasm-core.service \
         /usr/lib/systemd/system/wasm-core.socket /usr/lib/sysusers.d/wasm-core.conf \
         /etc/wasm-core/config.toml /usr/share/man/man8/wasmcored.8.gz \
         /usr/share/wasm-core/plugins/uppercase.wasm; do
  grep -qx "$f" <<<"$files" || fail "missing $f"
done
rpm -qcp "$rpm" | grep -qx /etc/wasm-core/config.toml || fail "the config is not %config"
scripts=$(rpm -qp --scripts "$rpm")
grep -q 'systemd-sysusers' <<<"$scripts" || fail "no sysusers in %pre"
grep -q 'wasm-core.socket' <<<"$scripts" || fail "no socket handling in the scriptlets"
grep -q 'try-restart wasm-core.service\|mark-restart-system-units wasm-core.service' <<<"$scripts" || fail "no restart on upgrade"
pyfiles=$(rpm -qlp "$pyrpm")
for f in __init__.py client.py errors.py py.typed; do
  grep -q "/site-packages/wasmcore/$f\$" <<<"$pyfiles" || fail "python3-wasmcore lacks wasmcore/$f"
done
grep -q '/site-packages/wasmcore-.*\.dist-info/METADATA$' <<<"$pyfiles" || fail "python3-wasmcore lacks its dist-info"
echo "check-rpm: $rpm ok ($(du -h "$rpm" | cut -f1))"
echo "check-rpm: $pyrpm ok ($(du -h "$pyrpm" | cut -f1))"
