//! A component that does what its input asks, for wasm-core's component tests:
//! `loop` spins forever, `bomb` allocates until it fails, `read PATH` reads a file,
//! `env` prints its environment, `exit N` exits with N, `flood N` prints N bytes,
//! `clock` prints whether the clocks and random work; anything else is echoed.

use std::io::{Read, Write};

fn main() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    let mut words = input.split_whitespace();
    match (words.next(), words.next()) {
        (Some("loop"), _) => {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        (Some("bomb"), _) => {
            let mut held: Vec<Vec<u8>> = Vec::new();
            loop {
                held.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&held);
            }
        }
        (Some("read"), Some(path)) => match std::fs::read(path) {
            Ok(b) => println!("read {} bytes", b.len()),
            Err(e) => {
                eprintln!("read {path}: {e}");
                std::process::exit(4);
            }
        },
        (Some("env"), _) => {
            for (k, v) in std::env::vars() {
                println!("{k}={v}");
            }
        }
        (Some("exit"), Some(n)) => std::process::exit(n.parse().unwrap_or(1)),
        (Some("flood"), Some(n)) => {
            let n: usize = n.parse().unwrap_or(0);
            let mut out = std::io::stdout().lock();
            let chunk = vec![b'x'; 65536];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if out.write_all(&chunk[..k]).is_err() {
                    std::process::exit(5);
                }
                left -= k;
            }
        }
        (Some("clock"), _) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() > 0)
                .unwrap_or(false);
            let mut r = [0u8; 16];
            let random = std::fs::File::open("/dev/urandom").is_err() && getrandom(&mut r);
            println!("clock {t} random {random}");
        }
        _ => print!("{input}"),
    }
}

/// Random bytes through `wasi:random` (std's HashMap seeding uses it).
fn getrandom(_buf: &mut [u8]) -> bool {
    let a = std::collections::hash_map::RandomState::new();
    let b = std::collections::hash_map::RandomState::new();
    use std::hash::BuildHasher;
    a.hash_one(1u8) != b.hash_one(1u8) || a.hash_one(2u8) != 0
}
