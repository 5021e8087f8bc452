# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_wasmcorectl_global_optspecs
    string join \n socket= json h/help V/version
end

function __fish_wasmcorectl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_wasmcorectl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_wasmcorectl_using_subcommand
    set -l cmd (__fish_wasmcorectl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -s V -l version -d 'Print version'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "load" -d 'Load a module (.wasm, or .wat text) and print its UUID'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "execute" -d 'Run a binary; its output goes to stdout as raw bytes'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "chain" -d 'Run binaries in order, each one\'s output the next one\'s input'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "list" -d 'List your binaries and public ones'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "rollback" -d 'Move a name back to the version that was current before its current one (a second rollback undoes the first)'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "versions" -d 'List the versions a name keeps, in the order they became current (the current one last)'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "unload" -d 'Remove a binary and its plugin state; by name, every version of the name'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "info" -d 'Show a binary\'s metadata, imports, exports and limits'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "configure" -d 'Replace an Extism plugin\'s configuration without reloading it'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "push" -d 'Publish a module or component to an OCI registry as a Wasm artifact (the CNCF layout), with your registry credentials; print its reference pinned by digest'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "apply" -d 'Bring the binaries to what the provisioning files declare (admins): load, replace, reconfigure and unload as the files in provisioning.dir say, as the daemon does at start and on reload; print what changed'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "reload" -d 'Read the config file again and apply the provisioning files (admins), as SIGHUP does, and say what changed once both are done: what `systemctl reload wasm-core` runs. The exit status is 6 if the config file or a provisioning file was refused'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "status" -d 'Show the daemon\'s version, counts and limits, and who it thinks you are'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "metrics" -d 'Print the daemon\'s counters as OpenMetrics text (--json: the snapshot as the daemon sends it). A tenant sees its own figures; an admin sees every tenant\'s'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "top" -d 'A live view of the binaries (rates, latency, fuel, memory) or, with --tenants, of the tenants and their workers, like systemd-cgtop'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "bench" -d 'Measure every performance target against echo baselines in the same run'
complete -c wasmcorectl -n "__fish_wasmcorectl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l name -d 'A name to refer to the binary by (unique among your binaries)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l config -d 'A configuration entry an Extism plugin reads with `config_get` (repeatable). A replace without any keeps the current version\'s configuration' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l replace -d 'When you already have a binary of that name: make this module its current version in one step, keeping the old one for `rollback` (registry.keep_versions). A module with the current version\'s bytes changes nothing'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l public -d 'Let every tenant run it (admins only)'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l inline -d 'Send the bytes inline (base64) instead of passing the open file'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l insecure -d 'Allow plain HTTP to the registry of an oci:// reference (always allowed for localhost, 127.0.0.1 and [::1])'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand load" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l function -d 'The function to call, for an Extism plugin that exports several' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l input -d 'The input as a string' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l input-file -d 'Read the input from a file' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l timeout-ms -d 'Wall-time limit of the execution (a chain: of all its stages), in milliseconds [default: the daemon\'s limits.default_timeout_ms, 5000; at most max_timeout_ms]' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l memory-limit-mb -d 'Linear-memory limit of the execution, in MiB [default: the daemon\'s limits.default_memory_mb, 64; at most max_memory_mb]' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l fuel -d 'Fuel budget (deterministic CPU limit)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand execute" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -l input -d 'The input as a string' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -l input-file -d 'Read the input from a file' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -l timeout-ms -d 'Wall-time limit of the execution (a chain: of all its stages), in milliseconds [default: the daemon\'s limits.default_timeout_ms, 5000; at most max_timeout_ms]' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -l memory-limit-mb -d 'Linear-memory limit of the execution, in MiB [default: the daemon\'s limits.default_memory_mb, 64; at most max_memory_mb]' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -l fuel -d 'Fuel budget (deterministic CPU limit)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand chain" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand list" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand list" -l all -d 'Every tenant\'s binaries (admins only)'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand list" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand list" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand rollback" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand rollback" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand rollback" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand versions" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand versions" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand versions" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand unload" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand unload" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand unload" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand info" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand info" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand info" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand configure" -l config -d 'The new configuration, whole (repeatable; none clears it)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand configure" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand configure" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand configure" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand push" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand push" -l insecure -d 'Allow plain HTTP to the registry (always allowed for localhost, 127.0.0.1 and [::1])'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand push" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand push" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand apply" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand apply" -l dry-run -d 'Only print what would change'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand apply" -l insecure -d 'Allow plain HTTP to the registries of oci:// sources (always allowed for localhost, 127.0.0.1 and [::1])'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand apply" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand apply" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand reload" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand reload" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand reload" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand status" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand status" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand status" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand metrics" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand metrics" -l prometheus -d 'Prometheus\' text format 0.0.4 instead of OpenMetrics'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand metrics" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand metrics" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -s d -l delay -d 'Seconds between refreshes' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -s n -l iterations -d 'Stop after this many refreshes (default: run until `q` or Ctrl-C)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -l order -d 'The sort key' -r -f -a "executions\t''
errors\t''
p99\t''
fuel\t''
memory\t''
name\t''"
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -l rows -d 'At most this many rows (default: all in batch mode, what fits on a terminal)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -s b -l batch -d 'Plain snapshots even on a terminal'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -l tenants -d 'One row per tenant (its worker process\'s CPU and memory) instead of one per binary'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand top" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l binary -d 'Binary to run (UUID, NAME or OWNER/NAME)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l load -d 'Load this module for the run and unload it after' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l input -d 'Input of every execution' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l duration-ms -d 'How long each throughput measurement runs' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l rounds -d 'Rounds per scenario, alternating the baselines and the daemon; medians are reported' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l pipeline -d 'Requests in flight per connection in the pipelined runs' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l chain -d 'Stages of the chain measurement (the same binary repeated)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l plugins -d 'Load every .wasm file in this directory once and report its compile time' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l executions -d 'Executions for the memory-growth measurement (0: skip it)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l copies -d 'Copies of the binary loaded to measure memory per cached binary (0: skip it)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l extism -d 'An Extism plugin with one function, executed by 10 connections ping-pong (its own row, against the same echo baselines; skipped when not given)' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l wasi -d 'A WASI command module compared against `wasmtime run` (when `wasmtime` is on PATH)' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l rotate -d 'Distinct binaries (copies of `--load`\'s module) the rotation scenario cycles through (0: skip it)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l tenants -d 'Tenants of the multi-tenant scenario: client processes under UIDs `--tenant-uid`, `--tenant-uid` + 1, …, each loading its own copy of `--load`\'s module (needs root; 0: skip it)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l tenant-uid -d 'The first UID of the multi-tenant scenario\'s clients (they need no account)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l engine-us -d 'The in-process cost of one execution in µs (from `cargo bench -p wasmcored --bench exec`), to compare the daemon\'s CPU per request against' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l floor-us -d 'The bare-Wasmtime floor of one execution in µs (from `cargo bench -p wasmcored --bench exec -- --floor-us`): the daemon\'s CPU per request beyond the echo\'s is also reported in floors' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l floor-parallel-us -d 'The same floor with every CPU running executions at once, in CPU µs per execution (`cargo bench -p wasmcored --bench exec -- --floor-parallel-us`): the multi-connection scenarios are also reported in it, for what bare Wasmtime itself costs on busy cores' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l floor-cmd -d 'A command (run with `sh -c`) that prints the floor of one execution in µs, run before and after every scenario: the scenario is reported in the mean of the two, a floor measured in the same minute as the load on a machine whose speed drifts (e.g. `cargo bench -q -p wasmcored --bench exec -- --floor-us`)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l floor-parallel-cmd -d 'The same for the parallel floor (`--floor-parallel-us`)' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l only -d 'Run only these scenarios (comma-separated: ping1, ping10, pipe1, pipe10, chain10, tenants, rotate, extism10), e.g. to profile one' -r
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l socket -d 'Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]' -r -F
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l check -d 'Fail (exit status 1) on a gross regression of the throughput ratios'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -l json -d 'Print the daemon\'s full JSON response instead of human output'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand bench" -s h -l help -d 'Print help'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "load" -d 'Load a module (.wasm, or .wat text) and print its UUID'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "execute" -d 'Run a binary; its output goes to stdout as raw bytes'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "chain" -d 'Run binaries in order, each one\'s output the next one\'s input'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "list" -d 'List your binaries and public ones'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "rollback" -d 'Move a name back to the version that was current before its current one (a second rollback undoes the first)'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "versions" -d 'List the versions a name keeps, in the order they became current (the current one last)'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "unload" -d 'Remove a binary and its plugin state; by name, every version of the name'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "info" -d 'Show a binary\'s metadata, imports, exports and limits'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "configure" -d 'Replace an Extism plugin\'s configuration without reloading it'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "push" -d 'Publish a module or component to an OCI registry as a Wasm artifact (the CNCF layout), with your registry credentials; print its reference pinned by digest'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "apply" -d 'Bring the binaries to what the provisioning files declare (admins): load, replace, reconfigure and unload as the files in provisioning.dir say, as the daemon does at start and on reload; print what changed'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "reload" -d 'Read the config file again and apply the provisioning files (admins), as SIGHUP does, and say what changed once both are done: what `systemctl reload wasm-core` runs. The exit status is 6 if the config file or a provisioning file was refused'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "status" -d 'Show the daemon\'s version, counts and limits, and who it thinks you are'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "metrics" -d 'Print the daemon\'s counters as OpenMetrics text (--json: the snapshot as the daemon sends it). A tenant sees its own figures; an admin sees every tenant\'s'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "top" -d 'A live view of the binaries (rates, latency, fuel, memory) or, with --tenants, of the tenants and their workers, like systemd-cgtop'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "bench" -d 'Measure every performance target against echo baselines in the same run'
complete -c wasmcorectl -n "__fish_wasmcorectl_using_subcommand help; and not __fish_seen_subcommand_from load execute chain list rollback versions unload info configure push apply reload status metrics top bench help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
