//! The shipped systemd units: valid for systemd (`systemd-analyze verify`) and hardened
//! (`systemd-analyze security --offline=yes` at most 1.0), with the three options that
//! break Wasmtime or tenancy left off and explained.

use std::process::Command;

use wasmcore_tests::repo;

fn units() -> [std::path::PathBuf; 4] {
    let dir = repo().join("systemd");
    [
        dir.join("wasm-core.socket"),
        dir.join("wasm-core.service"),
        dir.join("wasm-core-metrics.socket"),
        dir.join("wasm-core-metrics.service"),
    ]
}

#[test]
fn the_units_verify() {
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(units())
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // The programs are not installed on the machine running the tests; anything else counts.
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.trim().is_empty()
                && !l.contains("/usr/bin/wasmcored is not executable")
                && !l.contains("/usr/bin/wasm-core-metrics is not executable")
                && !l.contains("/usr/bin/wasmcorectl is not executable")
        })
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify: {problems:?}");
}

/// `systemd-analyze security --offline=yes` of `service`: its exposure score, and the report.
fn exposure(service: &std::path::Path) -> (f64, String) {
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(service)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let name = service.file_name().unwrap().to_string_lossy();
    let score = text
        .lines()
        .find_map(|l| {
            l.split(&format!("Overall exposure level for {name}: "))
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    (score, text)
}

#[test]
fn the_service_is_hardened() {
    let service = &units()[1];
    let (score, text) = exposure(service);
    assert!(score <= 1.0, "exposure {score} > 1.0:\n{text}");
    let unit = std::fs::read_to_string(service).unwrap();
    for key in ["MemoryDenyWriteExecute=", "PrivateUsers=", "LimitAS="] {
        assert!(
            !unit.lines().any(|l| l.starts_with(key)),
            "{key} must stay off"
        );
        assert!(
            unit.contains(&format!("# - {key}")),
            "{key}: say why it is off"
        );
    }
}

#[test]
fn the_metrics_exporter_is_hardened() {
    let (score, text) = exposure(&units()[3]);
    assert!(score <= 1.0, "exposure {score} > 1.0:\n{text}");
    // Every tenant's figures are behind that port: the socket unit says so.
    let socket = std::fs::read_to_string(&units()[2]).unwrap();
    assert!(socket.contains("ListenStream=127.0.0.1:"), "loopback only");
    assert!(socket.contains("sees every tenant's figures"));
}
