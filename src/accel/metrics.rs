//! The service's counters, served at `/metrics` in Prometheus's text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::tasks::Status;

/// Upper bounds (seconds) of the conversion-duration histogram's buckets.
const BUCKETS: [f64; 8] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0];

/// Counters; all start at zero with the process.
#[derive(Default)]
pub struct Metrics {
    /// Webhook and notification requests answered, by endpoint and status code.
    requests: Mutex<Vec<(String, u16, u64)>>,
    /// Requests refused for a wrong or missing auth header.
    pub unauthorized: AtomicU64,
    /// Tasks created.
    pub tasks_created: AtomicU64,
    /// Events for an image a task already covers.
    pub duplicates: AtomicU64,
    /// Pushed images not converted by the rules (the service's own output, untagged).
    pub events_skipped: AtomicU64,
    /// Conversions finished, by outcome.
    pub completed: AtomicU64,
    /// Conversions that failed.
    pub failed: AtomicU64,
    /// Tasks skipped by a worker (already Skiff or Nydus).
    pub skipped: AtomicU64,
    durations: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    /// One request to `endpoint` answered with `code`.
    pub fn request(&self, endpoint: &str, code: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match r.iter_mut().find(|(e, c, _)| e == endpoint && *c == code) {
            Some(slot) => slot.2 += 1,
            None => r.push((endpoint.to_string(), code, 1)),
        }
    }

    /// One conversion took `seconds`.
    pub fn conversion(&self, seconds: f64) {
        let mut h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// The text exposition, with the task list's counts by status.
    pub fn render(&self, tasks: &[(Status, u64)]) -> String {
        let mut s = String::new();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(s, "# HELP skiff_accel_requests_total Webhook and notification requests, by endpoint and HTTP status.");
        let _ = writeln!(s, "# TYPE skiff_accel_requests_total counter");
        for (e, c, v) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "skiff_accel_requests_total{{endpoint=\"{e}\",code=\"{c}\"}} {v}"
            );
        }
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {v}");
        };
        counter(
            &mut s,
            "skiff_accel_unauthorized_total",
            "Requests refused for a wrong or missing auth header.",
            n(&self.unauthorized),
        );
        counter(
            &mut s,
            "skiff_accel_tasks_created_total",
            "Conversion tasks created.",
            n(&self.tasks_created),
        );
        counter(
            &mut s,
            "skiff_accel_duplicate_events_total",
            "Events for an image a task already covers.",
            n(&self.duplicates),
        );
        counter(
            &mut s,
            "skiff_accel_skipped_events_total",
            "Pushed images the rules do not convert (the service's own output, untagged pushes).",
            n(&self.events_skipped),
        );
        let _ = writeln!(
            s,
            "# HELP skiff_accel_conversions_total Conversions finished, by outcome."
        );
        let _ = writeln!(s, "# TYPE skiff_accel_conversions_total counter");
        for (label, v) in [
            ("completed", n(&self.completed)),
            ("failed", n(&self.failed)),
            ("skipped", n(&self.skipped)),
        ] {
            let _ = writeln!(
                s,
                "skiff_accel_conversions_total{{outcome=\"{label}\"}} {v}"
            );
        }
        let _ = writeln!(s, "# HELP skiff_accel_tasks Tasks in the list, by status.");
        let _ = writeln!(s, "# TYPE skiff_accel_tasks gauge");
        for (st, v) in tasks {
            let _ = writeln!(s, "skiff_accel_tasks{{status=\"{}\"}} {v}", st.label());
        }
        let h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            s,
            "# HELP skiff_accel_conversion_duration_seconds Time of successful conversions."
        );
        let _ = writeln!(
            s,
            "# TYPE skiff_accel_conversion_duration_seconds histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "skiff_accel_conversion_duration_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            s,
            "skiff_accel_conversion_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(s, "skiff_accel_conversion_duration_seconds_sum {}", h.sum);
        let _ = writeln!(
            s,
            "skiff_accel_conversion_duration_seconds_count {}",
            h.count
        );
        s
    }
}
