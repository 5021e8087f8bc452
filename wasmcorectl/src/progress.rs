//! A progress line on stderr for long work, on a terminal only: what is happening and for
//! how long, redrawn in place, cleared when done. Off a terminal nothing is printed.

use std::io::{IsTerminal, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A live progress line; cleared on drop.
#[derive(Debug)]
pub struct Progress {
    what: Arc<Mutex<String>>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Show `what` with the elapsed time while the value lives (a no-op off a terminal).
    pub fn start(what: impl Into<String>) -> Progress {
        let what = Arc::new(Mutex::new(what.into()));
        if !std::io::stderr().is_terminal() {
            return Progress {
                what,
                stop: None,
                thread: None,
            };
        }
        let (tx, rx) = channel();
        let shown = what.clone();
        let thread = std::thread::spawn(move || draw(&shown, &rx));
        Progress {
            what,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Change what is shown (the elapsed time keeps counting).
    pub fn set(&self, what: impl Into<String>) {
        *self.what.lock().unwrap_or_else(|p| p.into_inner()) = what.into();
    }
}

fn draw(what: &Mutex<String>, stop: &Receiver<()>) {
    let start = Instant::now();
    loop {
        let line = format!(
            "\r\x1b[2K{} {:.1} s",
            what.lock().unwrap_or_else(|p| p.into_inner()),
            start.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        match stop.recv_timeout(Duration::from_millis(100)) {
            Err(RecvTimeoutError::Timeout) => continue,
            _ => break,
        }
    }
    let _ = std::io::stderr().lock().write_all(b"\r\x1b[2K");
}

impl Drop for Progress {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
