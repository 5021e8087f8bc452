//! `counter`: counts how often it was called, per key, in plugin state.
//!
//! The input is the key (empty input: the key `default`). Each execution adds one to the
//! counter stored under the key and outputs the new value in decimal. State is kept per
//! tenant and binary, so two tenants never see each other's counts. The input `reset:KEY`
//! deletes the counter and outputs `0`.

wasmcore_pdk::plugin!(|input: &[u8]| {
    if let Some(key) = input.strip_prefix(b"reset:") {
        wasmcore_pdk::delete_state(key);
        return Ok(b"0".to_vec());
    }
    let key: &[u8] = if input.is_empty() { b"default" } else { input };
    let current = match wasmcore_pdk::get_state(key) {
        Some(v) if v.len() == 8 => u64::from_le_bytes(v.try_into().unwrap_or([0; 8])),
        Some(_) => {
            wasmcore_pdk::log("counter: stored value has an unexpected size; starting over");
            0
        }
        None => 0,
    };
    let next = current + 1;
    wasmcore_pdk::set_state(key, &next.to_le_bytes());
    Ok(next.to_string().into_bytes())
});
