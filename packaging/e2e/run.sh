#!/usr/bin/env bash
# The test that proves wasm-core works the way a user meets it: with this checkout's .debs
# (built by `make deb`) and the previous release's (built from its commit, cached), install
# the previous one into a Debian 12 root (debootstrap, cached between runs), boot that root with
# systemd-nspawn, and run packaging/e2e/inside.sh there as a unit: it exercises the
# service, upgrades it to this checkout's packages with apt, then removes and purges it.
# Needs root. Cache: $WASMCORE_E2E_CACHE (default /var/cache/wasm-core-e2e).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cache=${WASMCORE_E2E_CACHE:-/var/cache/wasm-core-e2e}
start=$(date +%s)

"$top/packaging/ensure-packages.sh" debootstrap systemd-container

base="$cache/base"
include=systemd,systemd-sysv,dbus,util-linux,passwd,python3
if [ "$(cat "$base/.complete" 2>/dev/null)" != "$include" ]; then
  echo "e2e: debootstrapping Debian 12 into $base (cached for later runs)"
  rm -rf "$base.new"
  mkdir -p "$cache"
  debootstrap --variant=minbase --include="$include" \
    bookworm "$base.new" >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; exit 1; }
  echo "$include" >"$base.new/.complete"
  rm -rf "$base"
  mv "$base.new" "$base"
fi

# This checkout's packages, built and checked by `make deb` (make e2e runs it first).
version=$(cd "$top" && dpkg-parsechangelog -S Version)
arch=$(dpkg --print-architecture)
for f in "$top/../wasm-core_${version}_${arch}.deb" "$top/../python3-wasmcore_${version}_all.deb"; do
  [ -e "$f" ] || { echo "e2e: $f is missing: run make deb (make e2e does)" >&2; exit 1; }
done
# The previous release: the last commit before tenant workers (state directory format 1),
# built as a package with a lower version. Its .debs are kept in the cache. The build
# starts from a copy of this checkout's compiled dependencies (not its own crates, whose
# sources are newer), so only what differs is compiled.
prev="${version}~prev"
prev_commit=99497c2ea30aac1f5aa1c3dfb289abc18b7d4815
prev_dir="$cache/prev-$prev_commit"
prev_debs=("$prev_dir/wasm-core_${prev}_${arch}.deb" "$prev_dir/python3-wasmcore_${prev}_all.deb")
if ! [ -e "${prev_debs[0]}" ] || ! [ -e "${prev_debs[1]}" ] || ! [ -e "$prev_dir/state-format" ]; then
  if git -C "$top" cat-file -e "$prev_commit^{commit}" 2>/dev/null; then
    echo "e2e: building the previous release ($prev_commit) as $prev"
    rm -rf "$prev_dir"
    mkdir -p "$prev_dir/src/target/release"
    git -C "$top" archive "$prev_commit" | tar -x -m -C "$prev_dir/src"
    if [ -d "$top/target/release/deps" ]; then
      tar -C "$top/target/release" -cf - --exclude='*wasmcore*' deps build .fingerprint |
        tar -C "$prev_dir/src/target/release" -xf -
    fi
    [ -d "$top/plugins/target" ] && cp -a "$top/plugins/target" "$prev_dir/src/plugins/"
    sed -i "1s/(${version})/(${prev})/" "$prev_dir/src/debian/changelog"
    (cd "$prev_dir/src" && CARGO_INCREMENTAL=0 dpkg-buildpackage -us -uc -b) >"$cache/build-prev.log" 2>&1 ||
      { tail -40 "$cache/build-prev.log"; exit 1; }
    rm -rf "$prev_dir/src"
    echo 1 >"$prev_dir/state-format"
  else
    # A clone without that commit (a shallow one): the previous release is this tree with
    # the lower version, and the upgrade does not cross the state format.
    echo "e2e: WARNING: commit $prev_commit is not in this clone; the previous release is this tree as $prev" >&2
    mkdir -p "$prev_dir"
    cp "$top/debian/changelog" "$cache/changelog.saved"
    restore() { cp "$cache/changelog.saved" "$top/debian/changelog"; }
    trap restore EXIT
    sed -i "1s/(${version})/(${prev})/" "$top/debian/changelog"
    (cd "$top" && dpkg-buildpackage -us -uc -b) >"$cache/build-prev.log" 2>&1 || { tail -40 "$cache/build-prev.log"; exit 1; }
    restore
    mv "$top/../wasm-core_${prev}_${arch}.deb" "$top/../python3-wasmcore_${prev}_all.deb" "$prev_dir/"
    echo 2 >"$prev_dir/state-format"
  fi
fi

root="$cache/run"
rm -rf "$root"
cp -a "$base" "$root"
# Not in /tmp: the booted container mounts a tmpfs there.
mkdir -p "$root/srv/e2e/prev" "$root/srv/e2e/new"
cp "${prev_debs[@]}" "$root/srv/e2e/prev/"
cp "$top/wasmcored/tests/fixtures/memory_hog.wasm" "$root/srv/e2e/"
cp "$prev_dir/state-format" "$root/e2e-prev-state-format"
cp "$top/../wasm-core_${version}_${arch}.deb" "$top/../python3-wasmcore_${version}_all.deb" "$root/srv/e2e/new/"
echo "$version" >"$root/e2e-new-version"
chroot "$root" sh -c 'dpkg -i /srv/e2e/prev/*.deb' >"$cache/install.log" 2>&1 || { cat "$cache/install.log"; exit 1; }
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
