//! wasmcore-pdk: write wasm-core plugins (process ABI v1) in safe Rust.
//!
//! ```ignore
//! wasmcore_pdk::plugin!(|input: &[u8]| -> Result<Vec<u8>, i32> {
//!     Ok(input.to_ascii_uppercase())
//! });
//! ```
//!
//! The macro exports `alloc` and `process` as docs/PLUGIN_ABI.md specifies; [`output`],
//! [`log`], [`get_state`], [`set_state`] and [`delete_state`] wrap the `host` imports. No
//! dependencies, no allocator tricks: `alloc` hands out buffers from Rust's global allocator
//! and the instance is thrown away after each execution.

#![no_std]

extern crate alloc;


#[cfg(target_arch = "wasm32")]
mod host {
    #[link(wasm_import_module = "host")]
    unsafe extern "C" {
        pub fn log(ptr: *const u8, len: usize);
        pub fn output(ptr: *const u8, len: usize);
        pub fn get_state(key_ptr: *const u8, key_len: usize) -> i32;
        pub fn set_state(key_ptr: *const u8, key_len: usize, val_ptr: *const u8, val_len: usize);
        pub fn delete_state(key_ptr: *const u8, key_len: usize);
    }
}

/// Append bytes to the execution's output.
pub fn output(bytes: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the pointer and length describe a live slice; the host only reads it.
    unsafe {
        host::output(bytes.as_ptr(), bytes.len())
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = bytes;
}

/// Write one log line (returned to the caller with the result).
pub fn log(line: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: as in `output`.
    unsafe {
        host::log(line.as_ptr(), line.len())
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = line;
}

/// The value stored under `key` for this binary and the calling tenant.
pub fn get_state(key: &[u8]) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: as in `output`. A non-negative result points at a buffer the host got
        // from our own `alloc` and filled with a 4-byte little-endian length and the value.
        let ptr = unsafe { host::get_state(key.as_ptr(), key.len()) };
        if ptr < 0 {
            return None;
        }
        let buf = unsafe { take_buffer(ptr as usize) };
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        Some(buf[4..4 + len].to_vec())
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = key;
        None
    }
}

/// Store `value` under `key`; kept only if this execution succeeds.
pub fn set_state(key: &[u8], value: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: as in `output`.
    unsafe {
        host::set_state(key.as_ptr(), key.len(), value.as_ptr(), value.len())
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (key, value);
}

/// Remove `key`; kept only if this execution succeeds.
pub fn delete_state(key: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: as in `output`.
    unsafe {
        host::delete_state(key.as_ptr(), key.len())
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = key;
}

/// Buffers handed out by `alloc`, so `get_state` can take ownership back.
#[doc(hidden)]
pub fn alloc_buffer(len: usize) -> *mut u8 {
    // Room for the length header so the buffer can be rebuilt as a Vec later.
    let mut v: Vec<u8> = Vec::with_capacity(len + 4);
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.resize(len + 4, 0);
    let ptr = v.as_mut_ptr();
    core::mem::forget(v);
    // SAFETY: the allocation is len + 4 bytes long.
    unsafe { ptr.add(4) }
}

/// Take back a buffer returned by [`alloc_buffer`].
///
/// # Safety
/// `ptr` must come from [`alloc_buffer`] and not have been taken before.
#[doc(hidden)]
pub unsafe fn take_buffer(ptr: usize) -> Vec<u8> {
    // SAFETY: per the contract, ptr - 4 starts an allocation of len + 4 bytes whose first
    // four bytes hold len.
    unsafe {
        let base = (ptr as *mut u8).sub(4);
        let len = u32::from_le_bytes([*base, *base.add(1), *base.add(2), *base.add(3)]) as usize;
        let mut v = Vec::from_raw_parts(base, len + 4, len + 4);
        v.drain(..4);
        v
    }
}

/// Export `alloc` and `process` around `f(input) -> Result<output, code>`.
/// `Ok` output is sent with [`output`]; `Err(code)` becomes the non-zero return code
/// (`plugin_error` with that code). Use a non-zero code: 0 would mean success.
#[macro_export]
macro_rules! plugin {
    ($f:expr) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn alloc(len: i32) -> i32 {
            $crate::alloc_buffer(len.max(0) as usize) as i32
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn process(ptr: i32, len: i32) -> i32 {
            // SAFETY: the host wrote `len` input bytes into the buffer our `alloc` returned.
            let input = unsafe { $crate::take_buffer(ptr as usize) };
            let input = &input[..len.max(0) as usize];
            let f: fn(&[u8]) -> ::core::result::Result<$crate::Vec<u8>, i32> = $f;
            match f(input) {
                Ok(out) => {
                    $crate::output(&out);
                    0
                }
                Err(code) => if code == 0 { 1 } else { code },
            }
        }
    };
}

#[doc(hidden)]
pub use alloc::vec::Vec;
