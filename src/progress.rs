//! Progress on stderr: plain lines (a terminal gets the same, rewritten in place).

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    last: Instant,
    tty: bool,
    quiet: bool,
}

impl Progress {
    /// `total` in bytes; small operations (< 256 MiB) print nothing.
    pub fn new(what: &'static str, total: u64) -> Self {
        Progress {
            what,
            total,
            done: 0,
            last: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            quiet: total < (256 << 20),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.quiet || self.last.elapsed().as_millis() < 500 {
            return;
        }
        self.last = Instant::now();
        let pct = if self.total == 0 { 100 } else { self.done * 100 / self.total };
        let mut e = std::io::stderr();
        if self.tty {
            let _ = write!(e, "\r{}: {} / {} MiB ({pct}%)", self.what, self.done >> 20, self.total >> 20);
        } else {
            let _ = writeln!(e, "{}: {} / {} MiB ({pct}%)", self.what, self.done >> 20, self.total >> 20);
        }
    }

    pub fn finish(&mut self) {
        if !self.quiet && self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}
