#!/usr/bin/env bash
# The test that proves wasm-core works the way a user meets it: build the .deb from this
# checkout, install it into a Debian 12 root (debootstrap, cached between runs), boot that
# root with systemd-nspawn, and run packaging/e2e/inside.sh there as a unit.
# Needs root. Cache: $WASMCORE_E2E_CACHE (default /var/cache/wasm-core-e2e).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cache=${WASMCORE_E2E_CACHE:-/var/cache/wasm-core-e2e}
start=$(date +%s)

"$top/packaging/ensure-packages.sh" debootstrap systemd-container

base="$cache/base"
if [ ! -e "$base/.complete" ]; then
  echo "e2e: debootstrapping Debian 12 into $base (cached for later runs)"
  rm -rf "$base.new"
  mkdir -p "$cache"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,util-linux,passwd \
    bookworm "$base.new" >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; exit 1; }
  touch "$base.new/.complete"
  rm -rf "$base"
  mv "$base.new" "$base"
fi

# Always the package of this checkout, built and checked.
"$top/packaging/check-deb.sh"
version=$(cd "$top" && dpkg-parsechangelog -S Version)
deb="$top/../wasm-core_${version}_$(dpkg --print-architecture).deb"

root="$cache/run"
rm -rf "$root"
cp -a "$base" "$root"
cp "$deb" "$root/tmp/wasm-core.deb"
chroot "$root" dpkg -i /tmp/wasm-core.deb >"$cache/install.log" 2>&1 || { cat "$cache/install.log"; exit 1; }
install -m 0755 "$top/packaging/e2e/inside.sh" "$root/usr/local/bin/wasm-core-e2e"
systemd-analyze security --offline=yes "$top/systemd/wasm-core.service" >"$cache/security-offline.txt" 2>/dev/null || true
sed -n 's/.*Overall exposure level for wasm-core.service: \([0-9.]*\).*/\1/p' "$cache/security-offline.txt" >"$root/e2e-offline-score"
cat >"$root/etc/systemd/system/wasm-core-e2e.service" <<'UNIT'
[Unit]
Description=wasm-core end-to-end checks
After=multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
ExecStart=/usr/local/bin/wasm-core-e2e
StandardOutput=file:/e2e.log
StandardError=inherit
[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable wasm-core-e2e.service >/dev/null 2>&1

echo "e2e: booting the container"
timeout 300 systemd-nspawn --register=no --keep-unit --quiet -D "$root" -b >"$cache/boot.log" 2>&1 || true
cat "$root/e2e.log" 2>/dev/null || echo "e2e: no results (see $cache/boot.log)"
cp "$root/e2e-security.txt" "$cache/security-booted.txt" 2>/dev/null || true
result=$(cat "$root/e2e.result" 2>/dev/null || echo "no result")
echo "e2e: $result in $(( $(date +%s) - start )) s"
[ "$result" = PASS ]
