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

/// Asks `question` on the terminal (true on y/yes); `yes` answers it in advance. Off a
/// terminal without `yes`, a usage error: nothing is done unasked.
pub fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    use std::io::IsTerminal;
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(crate::error::CliError::Usage(format!(
            "{question}: not on a terminal; add --yes to confirm"
        ))
        .into());
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
