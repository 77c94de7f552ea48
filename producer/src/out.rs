//! Writing to stdout without panicking when the reader has gone (`producer results | head`):
//! a closed pipe ends the output quietly.

use std::io::Write;

/// Writes `text` to stdout and flushes; false when stdout is closed (the caller stops
/// printing; nothing else is affected).
pub fn print(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// Writes `text` and a newline to stdout; false when stdout is closed.
pub fn line(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
}
