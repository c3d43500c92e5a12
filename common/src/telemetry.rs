//! Logging set-up shared by every binary.
//!
//! Logs go to stderr; `EARSHOT_LOG` takes a `tracing` filter (default
//! `info`). Audio and transcript text are never logged unless the service's
//! `debug_content` flag is set, which callers check through [`content`].

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

static DEBUG_CONTENT: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber. Safe to call more than once (tests); only
/// the first call takes effect.
pub fn init(debug_content: bool) {
    DEBUG_CONTENT.store(debug_content, Ordering::Relaxed);
    let filter = EnvFilter::try_from_env("EARSHOT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Whether transcript text and audio details may be logged.
pub fn debug_content() -> bool {
    DEBUG_CONTENT.load(Ordering::Relaxed)
}

/// The text to log for user content: the content itself only when the debug
/// flag is set, otherwise its length.
pub fn content(text: &str) -> String {
    if debug_content() {
        text.to_owned()
    } else {
        format!("<{} bytes redacted>", text.len())
    }
}
