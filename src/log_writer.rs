//! Where log lines go: standard output, with the lines that could not be
//! written (a full disk under a redirected log, a closed pipe) dropped and
//! counted for `/metrics`, since the log itself cannot say so.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

static FAILED: AtomicU64 = AtomicU64::new(0);

/// Log writes that failed since the start.
pub fn failed_writes() -> u64 {
    FAILED.load(Ordering::Relaxed)
}

/// Standard output for `tracing_subscriber::fmt().with_writer(..)`.
pub struct Stdout;

pub struct Line(io::Stdout);

// A line that cannot be written is counted and dropped, never an error:
// tracing-subscriber reports a failed write on standard error with
// `eprintln!`, which panics when standard error is that full disk too.
impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.write_all(buf).is_err() {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.0.flush().is_err() {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stdout {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(io::stdout())
    }
}
