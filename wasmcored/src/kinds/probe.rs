//! Test builds only (cargo feature `escape-probe`, `wasmcored-escape-probe` in `make test`):
//! host calls that do what an attacker who escaped Wasmtime inside a worker would try next,
//! each returning 0 or the errno it met. They show the worker's confinement from the inside
//! (tests/tests/e2e/workers.rs). A shipped binary has none of this.

use wasmtime::{Caller, Linker};

use crate::context::ExecCtx;

pub const PROBE_MODULE: &str = "wasmcore_escape_probe";
pub const FUNCTIONS: &[&str] = &["open", "socket", "signal", "exec"];

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

pub fn add_to_linker(linker: &mut Linker<ExecCtx>) -> wasmtime::Result<()> {
    // open(path_ptr, path_len): open the path read-only.
    linker.func_wrap(
        PROBE_MODULE,
        "open",
        |mut caller: Caller<'_, ExecCtx>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let Some(wasmtime::Extern::Memory(mem)) = caller.get_export("memory") else {
                return Ok(-1);
            };
            let data = mem.data(&caller);
            let Some(bytes) = data.get(ptr as usize..(ptr as usize).saturating_add(len as usize))
            else {
                return Ok(-1);
            };
            let path = String::from_utf8_lossy(bytes).into_owned();
            Ok(match std::fs::File::open(&path) {
                Ok(_) => 0,
                Err(e) => errno(&e),
            })
        },
    )?;
    // socket(): a TCP socket, as for a connection out.
    linker.func_wrap(PROBE_MODULE, "socket", || -> i32 {
        match std::net::TcpStream::connect("127.0.0.1:9") {
            Ok(_) => 0,
            Err(e) => errno(&e),
        }
    })?;
    // signal(pid): may this process signal `pid` (signal 0 checks without sending)?
    linker.func_wrap(PROBE_MODULE, "signal", |pid: i32| -> i32 {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) => 0,
            Err(e) => e as i32,
        }
    })?;
    // exec(): start a program.
    linker.func_wrap(PROBE_MODULE, "exec", || -> i32 {
        match std::process::Command::new("/bin/true").status() {
            Ok(_) => 0,
            Err(e) => errno(&e),
        }
    })?;
    Ok(())
}
