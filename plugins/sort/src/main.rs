//! `sort` (component: `cargo build --target wasm32-wasip2` of a plain `fn main`): sorts the
//! lines of stdin and prints them, like `sort`; a line of stderr says how many it sorted.
//! Input that is not UTF-8 is refused with exit status 2.

use std::io::{Read, Write};

fn main() {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("sort: reading stdin: {e}");
        std::process::exit(2);
    }
    let mut lines: Vec<&str> = input.lines().collect();
    lines.sort_unstable();
    let n = lines.len();
    eprintln!("sort: {n} line{}", if n == 1 { "" } else { "s" });
    let mut out = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
}
