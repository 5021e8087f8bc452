//! `uppercase`: ASCII letters of the input in upper case; every other byte unchanged.

wasmcore_pdk::plugin!(|input: &[u8]| Ok(input.to_ascii_uppercase()));
