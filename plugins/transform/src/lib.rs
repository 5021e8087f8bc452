//! `transform`: turn text into a URL slug.
//!
//! ASCII letters and digits are kept (letters lower-cased); every run of anything else
//! becomes one `-`; no `-` at either end. `"Hello, World! 2024 edition"` →
//! `"hello-world-2024-edition"`. Input that is not UTF-8 is refused with code 2 (a slug of
//! arbitrary bytes would be meaningless); an input with no letters or digits gives an empty
//! output.

wasmcore_pdk::plugin!(|input: &[u8]| {
    if core::str::from_utf8(input).is_err() {
        wasmcore_pdk::log("transform: input is not UTF-8");
        return Err(2);
    }
    Ok(slug(input))
});

fn slug(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut pending_dash = false;
    for &b in input {
        if b.is_ascii_alphanumeric() {
            if pending_dash && !out.is_empty() {
                out.push(b'-');
            }
            pending_dash = false;
            out.push(b.to_ascii_lowercase());
        } else {
            pending_dash = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn slugs() {
        assert_eq!(super::slug(b"Hello, World! 2024 edition"), b"hello-world-2024-edition");
        assert_eq!(super::slug(b"  --a--  "), b"a");
        assert_eq!(super::slug("Ça va?".as_bytes()), b"a-va");
        assert_eq!(super::slug(b"!!!"), b"");
    }
}
