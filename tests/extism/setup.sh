#!/usr/bin/env bash
# The reference runtime for the Extism differential tests: PyPI's `extism` (which brings
# `extism-sys`, Extism's native runtime) in a venv under target/. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/../../target/extism-venv"
"$here/../../packaging/ensure-packages.sh" python3 python3-venv
if ! "$venv/bin/python" -c 'import extism' 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'extism==1.1.1' 'extism-sys==1.41.0'
fi
