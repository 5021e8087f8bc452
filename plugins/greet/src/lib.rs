//! `greet` (Extism plugin, written with Extism's Rust PDK): runs unmodified under wasm-core
//! and under Extism's own runtime. Several functions, so a caller chooses one:
//! - `greet`: "<greeting>, <input>!" where the greeting is the `greeting` config key
//!   (default "Hello");
//! - `count`: adds the input's length to the `total` var and returns the new total;
//! - `shout`: the input in upper case, logged at info level;
//! - `fail`: fails with an error that names the input;
//! - `fetch`: asks the host for an HTTP GET of the input (wasm-core refuses: no network).

use extism_pdk::*;

#[plugin_fn]
pub fn greet(name: String) -> FnResult<String> {
    let greeting = config::get("greeting")?.unwrap_or_else(|| "Hello".to_string());
    Ok(format!("{greeting}, {name}!"))
}

#[plugin_fn]
pub fn count(input: Vec<u8>) -> FnResult<String> {
    let total = match var::get::<String>("total")? {
        Some(t) => t.parse::<u64>().unwrap_or(0),
        None => 0,
    } + input.len() as u64;
    var::set("total", total.to_string())?;
    Ok(total.to_string())
}

#[plugin_fn]
pub fn shout(input: String) -> FnResult<String> {
    info!("shouting {} bytes", input.len());
    Ok(input.to_uppercase())
}

#[plugin_fn]
pub fn fail(input: String) -> FnResult<String> {
    Err(WithReturnCode::new(
        Error::msg(format!("refusing {input:?}")),
        3,
    ))
}

#[plugin_fn]
pub fn fetch(url: String) -> FnResult<Vec<u8>> {
    let res = http::request::<()>(&HttpRequest::new(url), None)?;
    Ok(res.body())
}
