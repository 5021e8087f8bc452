//! `wc` (WASI command): counts lines, words and bytes of stdin, like `wc`, and prints
//! `LINES WORDS BYTES`. A line of stderr reports the count of non-UTF-8 input. Exit status 0.

use std::io::{Read, Write};

fn main() {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("wc: reading stdin: {e}");
        std::process::exit(2);
    }
    let lines = input.iter().filter(|&&b| b == b'\n').count();
    let words = input
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .count();
    if std::str::from_utf8(&input).is_err() {
        eprintln!("wc: input is not UTF-8; counting bytes");
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{lines} {words} {}", input.len());
}
