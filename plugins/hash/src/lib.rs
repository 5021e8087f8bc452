//! `hash`: the SHA-256 of the input as 64 lower-case hex digits.

use sha2::{Digest, Sha256};

wasmcore_pdk::plugin!(|input: &[u8]| {
    let digest = Sha256::digest(input);
    let mut out = Vec::with_capacity(64);
    for b in digest {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 15) as usize]);
    }
    Ok(out)
});

const HEX: &[u8; 16] = b"0123456789abcdef";
