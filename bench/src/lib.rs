//! Shared pieces of weir's benchmark harnesses (`src/bin/*`): writing a harness's results
//! into its own section of `docs/benchmarks.md`, percentiles of latency samples, and a guard
//! that stops the peer processes a harness starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Stops and reaps a child process when dropped, also on error paths. SIGTERM first, so
/// that a master process (nginx's) takes its workers down with it; SIGKILL if it lingers.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `docs/benchmarks.md` at the workspace root.
pub fn benchmarks_md() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md")
}

/// Replace the section `name` of `docs/benchmarks.md` (between `<!-- BEGIN name -->` and
/// `<!-- END name -->`) with `markdown`, appending the section if it is not there yet.
/// Each harness owns exactly one section, so harnesses never overwrite each other.
pub fn write_section(name: &str, markdown: &str) -> std::io::Result<()> {
    let path = benchmarks_md();
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, replace_section(&old, name, markdown))
}

fn replace_section(doc: &str, name: &str, markdown: &str) -> String {
    let begin = format!("<!-- BEGIN {name} -->");
    let end = format!("<!-- END {name} -->");
    let body = format!("{begin}\n{}\n{end}", markdown.trim_end());
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{body}{}", &doc[..b], &doc[e + end.len()..]),
        _ if doc.is_empty() => format!("{body}\n"),
        _ => format!("{}\n\n{body}\n", doc.trim_end()),
    }
}

/// The `p`-th percentile (0..=100) of `samples`, by nearest rank; `None` if empty.
pub fn percentile(samples: &mut [Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_or_appended() {
        let doc = replace_section("", "dns", "| a |");
        assert_eq!(doc, "<!-- BEGIN dns -->\n| a |\n<!-- END dns -->\n");
        let doc = replace_section(&format!("# Title\n\n{doc}"), "lb", "x");
        assert!(doc.starts_with("# Title"));
        let doc = replace_section(&doc, "dns", "| b |\n");
        assert!(doc.contains("<!-- BEGIN dns -->\n| b |\n<!-- END dns -->"));
        assert!(!doc.contains("| a |"));
        assert!(doc.contains("<!-- BEGIN lb -->\nx\n<!-- END lb -->"));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut s, 50.0), Some(Duration::from_micros(50)));
        assert_eq!(percentile(&mut s, 99.0), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&mut s, 100.0), Some(Duration::from_micros(100)));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
