//! Counters of the daemon, exported as JSON (`/api/v1/metrics`) and in the Prometheus text
//! format (`/metrics`) by [`crate::api`].
//!
//! To add a metric: a field here, and one line in [`Counters::samples`]. Both endpoints are
//! generated from that list, so they cannot disagree.

use std::sync::atomic::{AtomicU64, Ordering};

/// Whether a sample only grows (a counter) or goes up and down (a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleKind {
    /// Monotonic since the daemon started.
    Counter,
    /// A current value.
    Gauge,
}

/// One exported value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Name, without the `skiff_` prefix the Prometheus output adds.
    pub name: &'static str,
    /// One line of help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: SampleKind,
    /// The value.
    pub value: u64,
}

/// The daemon's counters. All updates are relaxed atomics: they are statistics.
#[derive(Debug, Default)]
pub struct Counters {
    api_requests: AtomicU64,
    api_errors: AtomicU64,
    mounts: AtomicU64,
    umounts: AtomicU64,
}

impl Counters {
    /// Counts an API request, and whether it was answered with an error.
    pub fn api_request(&self, failed: bool) {
        self.api_requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.api_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a successful mount.
    pub fn mounted(&self) {
        self.mounts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a successful unmount.
    pub fn unmounted(&self) {
        self.umounts.fetch_add(1, Ordering::Relaxed);
    }

    /// Every metric, in a stable order.
    pub fn samples(&self) -> Vec<Sample> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mounts = get(&self.mounts);
        let umounts = get(&self.umounts);
        vec![
            Sample {
                name: "api_requests_total",
                help: "API requests served.",
                kind: SampleKind::Counter,
                value: get(&self.api_requests),
            },
            Sample {
                name: "api_errors_total",
                help: "API requests answered with an error status.",
                kind: SampleKind::Counter,
                value: get(&self.api_errors),
            },
            Sample {
                name: "mounts_total",
                help: "Successful mounts (passthrough_fs and rafs).",
                kind: SampleKind::Counter,
                value: mounts,
            },
            Sample {
                name: "umounts_total",
                help: "Successful unmounts.",
                kind: SampleKind::Counter,
                value: umounts,
            },
            Sample {
                name: "mounts_active",
                help: "Filesystems mounted now.",
                kind: SampleKind::Gauge,
                value: mounts.saturating_sub(umounts),
            },
        ]
    }
}
