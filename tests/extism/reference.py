"""Run plugin calls through Extism's own runtime (PyPI `extism`, with `extism-sys`).

Reads a JSON list of calls on stdin, each {"wasm": PATH, "function": NAME, "input_base64":
B64, "config": {...}, "wasi": BOOL}, and prints one JSON list of results: {"ok": true,
"output_base64": B64} or {"ok": false, "error": MESSAGE} (a message that is not UTF-8
decoded with replacement characters, as wasm-core's JSON carries it). Every call gets a new plugin, as
every wasm-core execution gets a fresh instance.
"""

import base64
import json
import sys

import extism


def main() -> None:
    results = []
    for call in json.load(sys.stdin):
        with open(call["wasm"], "rb") as f:
            wasm = f.read()
        plugin = extism.Plugin(wasm, wasi=call.get("wasi", False), config=call.get("config") or None)
        data = base64.b64decode(call["input_base64"])
        try:
            out = plugin.call(call["function"], data)
            results.append({"ok": True, "output_base64": base64.b64encode(bytes(out)).decode()})
        except extism.Error as e:
            results.append({"ok": False, "error": str(e)})
        except UnicodeDecodeError:
            # The plugin's error is not UTF-8: Extism hands its bytes over as they are, and
            # wasm-core's JSON carries them decoded with replacement characters.
            lib, ffi = extism.extism._lib, extism.extism._ffi
            raw = ffi.string(lib.extism_plugin_error(plugin.plugin))
            results.append({"ok": False, "error": raw.decode("utf-8", "replace")})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
