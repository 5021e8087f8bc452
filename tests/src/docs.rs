//! Generated documentation: the man pages of `wasmcored`, `wasmcorectl` and
//! `wasm-core-metrics` and the shell
//! completions of `wasmcorectl`, all from the clap definitions. `wasmcore-gen-docs` writes
//! them; a test checks the committed files are what the code generates.

use std::path::PathBuf;

use clap::CommandFactory;

/// (path relative to the repository, contents) of every generated file.
pub fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pages = vec![
        (
            wasmcored::cli::Args::command(),
            "8",
            "wasmcored".to_string(),
        ),
        (wasmcorectl::Cli::command(), "1", "wasmcorectl".to_string()),
        (
            wasmcorectl::exporter::Args::command(),
            "8",
            "wasm-core-metrics".to_string(),
        ),
    ];
    // One page per wasmcorectl subcommand, as the main page refers to them.
    let mut runnable = std::collections::HashMap::new();
    for sub in wasmcorectl::Cli::command().get_subcommands() {
        let name = format!("wasmcorectl-{}", sub.get_name());
        runnable.insert(name.clone(), format!("wasmcorectl {}", sub.get_name()));
        pages.push((sub.clone().name(name.clone()), "1", name));
    }
    for (cmd, section, name) in pages {
        let mut buf = Vec::new();
        let invoked = runnable.get(&name).cloned().unwrap_or_else(|| name.clone());
        let synopsis = synopsis(&cmd, &invoked);
        clap_mangen::Man::new(cmd)
            .section(section)
            .manual("wasm-core")
            .source(concat!("wasm-core ", env!("CARGO_PKG_VERSION")))
            .render(&mut buf)
            .expect("render man page");
        out.push((
            PathBuf::from(format!("man/{name}.{section}")),
            with_synopsis(buf, &synopsis),
        ));
    }
    for (shell, file) in [
        (
            clap_complete::Shell::Bash,
            "packaging/completions/wasmcorectl.bash",
        ),
        (
            clap_complete::Shell::Zsh,
            "packaging/completions/_wasmcorectl",
        ),
        (
            clap_complete::Shell::Fish,
            "packaging/completions/wasmcorectl.fish",
        ),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(
            shell,
            &mut wasmcorectl::Cli::command(),
            "wasmcorectl",
            &mut buf,
        );
        out.push((PathBuf::from(file), buf));
    }
    out
}

/// A SYNOPSIS line one can type: the command as it is invoked (`wasmcorectl chain`, not the
/// page's name), each option with the value it takes, the arguments by their value names.
fn synopsis(cmd: &clap::Command, invoked: &str) -> String {
    let esc = |s: &str| s.replace('-', "\\-");
    let mut parts = vec![format!("\\fB{}\\fR", esc(invoked))];
    let mut positionals = Vec::new();
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        if a.is_hide_set() || id == "help" || id == "version" {
            continue;
        }
        let values: Vec<String> = a
            .get_value_names()
            .map(|v| v.iter().map(|n| n.to_string()).collect())
            .unwrap_or_else(|| vec![id.to_uppercase()]);
        let takes_value = a.get_action().takes_values();
        let many = matches!(a.get_action(), clap::ArgAction::Append)
            || a.get_num_args().is_some_and(|n| n.max_values() > 1);
        if a.is_positional() {
            let mut p = format!("\\fI{}\\fR", values.join(" "));
            if many {
                p.push_str("...");
            }
            if !a.is_required_set() {
                p = format!("[{p}]");
            }
            positionals.push(p);
            continue;
        }
        let flag = match (a.get_short(), a.get_long()) {
            (_, Some(l)) => format!("\\fB\\-\\-{}\\fR", esc(l)),
            (Some(c), None) => format!("\\fB\\-{c}\\fR"),
            (None, None) => continue,
        };
        let mut o = if takes_value {
            format!("{flag} \\fI{}\\fR", values.join(" "))
        } else {
            flag
        };
        if many && takes_value {
            o.push_str("...");
        }
        parts.push(if a.is_required_set() {
            o
        } else {
            format!("[{o}]")
        });
    }
    parts.extend(positionals);
    if cmd.has_subcommands() {
        parts.push("\\fICOMMAND\\fR".into());
    }
    parts.join(" ")
}

/// `page` with its SYNOPSIS section's body replaced by `line`.
fn with_synopsis(page: Vec<u8>, line: &str) -> Vec<u8> {
    let text = String::from_utf8(page).expect("man pages are UTF-8");
    let Some(start) = text.find(".SH SYNOPSIS\n") else {
        return text.into_bytes();
    };
    let body = start + ".SH SYNOPSIS\n".len();
    let end = text[body..]
        .find("\n.SH ")
        .map_or(text.len(), |i| body + i + 1);
    format!("{}{line}\n{}", &text[..body], &text[end..]).into_bytes()
}
