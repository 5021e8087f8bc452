//! The committed man pages and completions are what the clap definitions generate
//! (regenerate with `make docs`).

#[test]
fn generated_docs_are_up_to_date() {
    let root = wasmcore_tests::repo();
    let mut stale = Vec::new();
    for (path, bytes) in wasmcore_tests::docs::generated() {
        if std::fs::read(root.join(&path)).ok().as_deref() != Some(&bytes[..]) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "out of date (run `make docs` and commit): {stale:?}"
    );
}

#[test]
fn the_config_man_page_covers_every_key_of_the_shipped_file() {
    let root = wasmcore_tests::repo();
    let shipped = std::fs::read_to_string(root.join("systemd/config.toml")).unwrap();
    let page = std::fs::read_to_string(root.join("man/wasm-core.toml.5")).unwrap();
    let mut missing = Vec::new();
    for line in shipped.lines() {
        let line = line.trim_start_matches("# ").trim();
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        if key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && !page.contains(&format!(".B {key}\n"))
        {
            missing.push(key.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "keys missing from wasm-core.toml(5): {missing:?}"
    );
}

/// Every option and argument of every command says what it does in `--help` and so in the
/// man pages.
#[test]
fn every_option_has_a_description() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: String, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(
        &wasmcorectl::Cli::command(),
        "wasmcorectl".into(),
        &mut missing,
    );
    walk(
        &wasmcored::cli::Args::command(),
        "wasmcored".into(),
        &mut missing,
    );
    assert!(missing.is_empty(), "without a description: {missing:?}");
}

/// Each man page's SYNOPSIS is a command one can type, with the values options take.
#[test]
fn man_page_synopses_are_runnable() {
    let root = wasmcore_tests::repo();
    for (page, want) in [
        (
            "man/wasmcorectl-chain.1",
            "wasmcorectl chain [--input INPUT] [--input-file FILE] [--timeout-ms MS]",
        ),
        ("man/wasmcorectl-load.1", "wasmcorectl load [--name NAME]"),
        (
            "man/wasmcored.8",
            "wasmcored [--config PATH] [--check-config]",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(page)).unwrap();
        let start = text.find(".SH SYNOPSIS\n").unwrap() + ".SH SYNOPSIS\n".len();
        let line = text[start..].lines().next().unwrap();
        let plain = line
            .replace("\\fB", "")
            .replace("\\fI", "")
            .replace("\\fR", "")
            .replace("\\-", "-");
        assert!(plain.starts_with(want), "{page}: {plain}");
    }
}
