//! End-to-end tests: the real `wasmcored` and `wasmcorectl`, real sockets, real UIDs.

mod clients;
mod components;
mod docs;
mod errors;
mod examples;
mod extism;
mod hostile;
mod metrics;
mod oci;
mod persistence;
mod provisioning;
mod socket;
mod systemd;
mod tenancy;
mod top;
mod units;
mod versions;
mod workers;

use serde_json::{Value, json};

/// Assert a success response and return it.
pub fn ok(v: &Value) -> &Value {
    assert_eq!(v["ok"], json!(true), "expected success: {v}");
    v
}

/// Assert an error response and return its code.
pub fn err_code(v: &Value) -> &str {
    assert_eq!(v["ok"], json!(false), "expected an error: {v}");
    v["error"]["code"].as_str().expect("error code")
}
