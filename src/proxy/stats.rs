//! The proxy's own request counters, kept as requests complete: per route (labelled with its
//! upstream) by status class, and durations. `metrics` reads them at scrape time.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Counted as requests complete. One set per route, labelled with its upstream, plus one for
/// requests answered before any route was chosen (no route, 429).
#[derive(Debug)]
pub struct RequestMetrics {
    /// (route label, upstream name) per route, then ("-", "-").
    labels: Vec<(String, String)>,
    by_route: Vec<([Counter; 5], Histogram)>,
}

impl RequestMetrics {
    /// (route label, upstream name) per route, as given to `new`.
    pub fn route_labels(&self) -> &[(String, String)] {
        &self.labels[..self.labels.len().saturating_sub(1)]
    }

    pub fn new(mut labels: Vec<(String, String)>) -> RequestMetrics {
        labels.push(("-".into(), "-".into()));
        RequestMetrics {
            by_route: labels
                .iter()
                .map(|_| {
                    (
                        Default::default(),
                        Histogram::new(exponential_buckets(0.001, 2.0, 16)),
                    )
                })
                .collect(),
            labels,
        }
    }

    /// One entry per label, in the same order: counts by status class, and durations.
    pub fn by_route(&self) -> &[([Counter; 5], Histogram)] {
        &self.by_route
    }

    /// (route label, upstream name) per route, then ("-", "-").
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    /// `route` None: answered by Breakwater itself before any route was chosen.
    pub fn observe(&self, route: Option<usize>, status: u16, seconds: f64) {
        let last = self.by_route.len() - 1;
        let (classes, duration) = &self.by_route[route.unwrap_or(last).min(last)];
        let class = (status / 100).clamp(1, 5) as usize - 1;
        classes[class].inc();
        duration.observe(seconds);
    }
}
