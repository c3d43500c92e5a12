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

/// Metric names a Prometheus text exposition declares, as they appear in
/// samples: counters with `_total`, other types as declared. Used to check
/// exports against `docs/metrics.md` and dashboards against exports.
pub fn exported_metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            Some(match parts.next()? {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            })
        })
        .collect()
}

/// Every `` `name` `` starting with `prefix` in a markdown document.
pub fn documented_metric_names(markdown: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with(prefix) && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .map(str::to_owned)
        .collect()
}

/// Compares the metrics an exposition declares under `prefix` with those
/// `docs/metrics.md` lists; `Err` says what differs. For each binary's test.
pub fn check_metrics_documented(exposition: &str, prefix: &str) -> Result<(), String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let doc = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let exported = exported_metric_names(exposition);
    let documented = documented_metric_names(&doc, prefix);
    if exported.is_empty() {
        return Err(format!("nothing exported under {prefix}"));
    }
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exported).collect();
    if undocumented.is_empty() && missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "docs/metrics.md is out of date: exported but not documented {undocumented:?}; documented but not exported {missing:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_type_lines_with_total_on_counters() {
        let text = "# HELP a_b x\n# TYPE a_b counter\na_b_total 1\n# TYPE a_c histogram\na_c_bucket{le=\"1\"} 0\n";
        let names: Vec<String> = exported_metric_names(text).into_iter().collect();
        assert_eq!(names, ["a_b_total", "a_c"]);
        let doc = "| `a_b_total` | counter |\n`a_x{label=\"y\"}` and `b_c`";
        let names: Vec<String> = documented_metric_names(doc, "a_").into_iter().collect();
        assert_eq!(names, ["a_b_total"]);
    }
}
