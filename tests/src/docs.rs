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
    for sub in wasmcorectl::Cli::command().get_subcommands() {
        let name = format!("wasmcorectl-{}", sub.get_name());
        pages.push((sub.clone().name(name.clone()), "1", name));
    }
    for (cmd, section, name) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .section(section)
            .manual("wasm-core")
            .source(concat!("wasm-core ", env!("CARGO_PKG_VERSION")))
            .render(&mut buf)
            .expect("render man page");
        out.push((PathBuf::from(format!("man/{name}.{section}")), buf));
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
