//! Process-wide counters for `/metrics`, kept in plain atomics and maps: the figures that only this
//! process sees (appends, conflicts, webhook answers, GitHub calls). Figures that Postgres knows
//! (lags, checkpoints, environments by status) are read at scrape time by the API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
pub const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Buckets for the preview steps, which take seconds to minutes.
pub const STEP_BUCKETS: [f64; 12] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

pub struct Histogram {
    bounds: &'static [f64; 12],
    counts: [AtomicU64; 12],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64; 12]) -> Self {
        Self { bounds, counts: [const { AtomicU64::new(0) }; 12], count: AtomicU64::new(0), sum_micros: AtomicU64::new(0) }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            out.push_str(&format!("{name}_bucket{{le=\"{bound}\"}} {}\n", count.load(Ordering::Relaxed)));
        }
        let total = self.count.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {total}\n"));
        out.push_str(&format!("{name}_sum {}\n", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6));
        out.push_str(&format!("{name}_count {total}\n"));
    }
}

/// A counter with one label.
pub struct LabeledCounter {
    values: Mutex<BTreeMap<String, u64>>,
}

impl LabeledCounter {
    const fn new() -> Self {
        Self { values: Mutex::new(BTreeMap::new()) }
    }

    pub fn inc(&self, label: &str) {
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *values.entry(label.to_string()).or_insert(0) += 1;
    }

    /// The count for `label` so far (0 if never counted).
    pub fn get(&self, label: &str) -> u64 {
        self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(label).copied().unwrap_or(0)
    }

    fn render(&self, name: &str, label: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        let values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (value, count) in values.iter() {
            out.push_str(&format!("{name}{{{label}=\"{}\"}} {count}\n", escape(value)));
        }
    }
}

/// Escapes a label value for the Prometheus text format.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub struct Metrics {
    pub events_appended: LabeledCounter,
    pub append_seconds: Histogram,
    pub append_conflicts: AtomicU64,
    /// INSERTs into the log by the command path; with `events_appended` it shows how many
    /// commands group commit put in each.
    pub append_statements: AtomicU64,
    /// Group statements that failed, by cause (`conflict`, `deadlock`, `other`); each of their
    /// commands was then tried alone.
    pub append_group_failures: LabeledCounter,
    pub webhook_deliveries: LabeledCounter,
    pub github_calls: LabeledCounter,
    /// `x-ratelimit-remaining` of GitHub's last answer; -1 before any.
    pub github_rate_limit_remaining: AtomicI64,
    pub active_subscriptions: AtomicI64,
    /// Executions shared by identical live subscriptions (each serves one or more of them).
    pub shared_subscription_executions: AtomicI64,
    /// Fetch, detect, install and build of one deployment.
    pub preview_build_seconds: Histogram,
    /// Start to the first passing health check.
    pub preview_start_seconds: Histogram,
    /// One deployment's whole test run.
    pub preview_test_seconds: Histogram,
    /// Deployments this worker finished, by outcome.
    pub preview_deployments: LabeledCounter,
    pub sandboxes_running: AtomicI64,
    pub sandbox_oom_kills: AtomicU64,
    /// Apps restarted because they stopped answering their health check.
    pub preview_restarts: AtomicU64,
    /// Rounds of numbering and publishing the log this process ran because no relay had
    /// published its events in time (`relay::stand_by`).
    pub relay_standby_rounds: AtomicU64,
}

pub static METRICS: Metrics = Metrics {
    events_appended: LabeledCounter::new(),
    append_seconds: Histogram::new(&BUCKETS),
    append_conflicts: AtomicU64::new(0),
    append_statements: AtomicU64::new(0),
    append_group_failures: LabeledCounter::new(),
    webhook_deliveries: LabeledCounter::new(),
    github_calls: LabeledCounter::new(),
    github_rate_limit_remaining: AtomicI64::new(-1),
    active_subscriptions: AtomicI64::new(0),
    shared_subscription_executions: AtomicI64::new(0),
    preview_build_seconds: Histogram::new(&STEP_BUCKETS),
    preview_start_seconds: Histogram::new(&STEP_BUCKETS),
    preview_test_seconds: Histogram::new(&STEP_BUCKETS),
    preview_deployments: LabeledCounter::new(),
    sandboxes_running: AtomicI64::new(0),
    sandbox_oom_kills: AtomicU64::new(0),
    preview_restarts: AtomicU64::new(0),
    relay_standby_rounds: AtomicU64::new(0),
};

impl Metrics {
    /// This process's figures in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        self.events_appended.render("understudy_events_appended_total", "type", "Events appended by this process, by event type.", out);
        self.append_seconds.render("understudy_append_seconds", "Time to decide and append one command (load, decide, commit).", out);
        out.push_str("# HELP understudy_append_conflicts_total Appends retried because another writer won the race.\n");
        out.push_str("# TYPE understudy_append_conflicts_total counter\n");
        out.push_str(&format!("understudy_append_conflicts_total {}\n", self.append_conflicts.load(Ordering::Relaxed)));
        out.push_str("# HELP understudy_append_statements_total INSERTs into the log by the command path (group commit puts many commands in one).\n");
        out.push_str("# TYPE understudy_append_statements_total counter\n");
        out.push_str(&format!("understudy_append_statements_total {}\n", self.append_statements.load(Ordering::Relaxed)));
        self.append_group_failures.render(
            "understudy_append_group_failures_total",
            "cause",
            "Group commit statements that failed, by cause; each of their commands was tried again alone.",
            out,
        );
        self.webhook_deliveries.render("understudy_webhook_deliveries_total", "result", "Webhook deliveries answered, by result.", out);
        self.github_calls.render("understudy_github_api_calls_total", "outcome", "GitHub API calls, by outcome.", out);
        out.push_str("# HELP understudy_github_rate_limit_remaining GitHub's x-ratelimit-remaining on its last answer (-1: none yet).\n");
        out.push_str("# TYPE understudy_github_rate_limit_remaining gauge\n");
        out.push_str(&format!("understudy_github_rate_limit_remaining {}\n", self.github_rate_limit_remaining.load(Ordering::Relaxed)));
        out.push_str("# HELP understudy_active_subscriptions GraphQL subscriptions open on this node.\n");
        out.push_str("# TYPE understudy_active_subscriptions gauge\n");
        out.push_str(&format!("understudy_active_subscriptions {}\n", self.active_subscriptions.load(Ordering::Relaxed)));
        out.push_str(
            "# HELP understudy_shared_subscription_executions Executions on this node that serve every open subscription identical to theirs.\n",
        );
        out.push_str("# TYPE understudy_shared_subscription_executions gauge\n");
        out.push_str(&format!(
            "understudy_shared_subscription_executions {}\n",
            self.shared_subscription_executions.load(Ordering::Relaxed)
        ));
        self.preview_build_seconds.render("understudy_preview_build_seconds", "Fetch, detection, install and build of a deployment.", out);
        self.preview_start_seconds.render("understudy_preview_start_seconds", "A preview's start until its health check passed.", out);
        self.preview_test_seconds.render("understudy_preview_test_seconds", "A deployment's whole test run.", out);
        self.preview_deployments.render(
            "understudy_preview_deployments_total",
            "outcome",
            "Deployments this process's worker let go of: served (Ready, then replaced or gone), failed, stopped (superseded, shut down), retried (infrastructure fault).",
            out,
        );
        out.push_str("# HELP understudy_sandboxes_running Sandboxed process trees (builds, apps, tests) running on this node.\n");
        out.push_str("# TYPE understudy_sandboxes_running gauge\n");
        out.push_str(&format!("understudy_sandboxes_running {}\n", self.sandboxes_running.load(Ordering::Relaxed)));
        let (memory, cpu) = crate::preview::sandbox::usage();
        out.push_str("# HELP understudy_sandbox_memory_bytes Memory the machine's running sandboxes use now (their cgroups).\n");
        out.push_str("# TYPE understudy_sandbox_memory_bytes gauge\n");
        out.push_str(&format!("understudy_sandbox_memory_bytes {memory}\n"));
        out.push_str("# HELP understudy_sandbox_cpu_seconds CPU time used so far by the machine's running sandboxes.\n");
        out.push_str("# TYPE understudy_sandbox_cpu_seconds gauge\n");
        out.push_str(&format!("understudy_sandbox_cpu_seconds {cpu:.3}\n"));
        out.push_str("# HELP understudy_sandbox_oom_kills_total Sandboxes whose memory limit killed a process.\n");
        out.push_str("# TYPE understudy_sandbox_oom_kills_total counter\n");
        out.push_str(&format!("understudy_sandbox_oom_kills_total {}\n", self.sandbox_oom_kills.load(Ordering::Relaxed)));
        out.push_str("# HELP understudy_preview_restarts_total Previews restarted because they stopped answering their health check.\n");
        out.push_str("# TYPE understudy_preview_restarts_total counter\n");
        out.push_str(&format!("understudy_preview_restarts_total {}\n", self.preview_restarts.load(Ordering::Relaxed)));
        out.push_str("# HELP understudy_relay_standby_rounds_total Rounds of numbering and publishing the log run because no relay had published this process's events in time.\n");
        out.push_str("# TYPE understudy_relay_standby_rounds_total counter\n");
        out.push_str(&format!("understudy_relay_standby_rounds_total {}\n", self.relay_standby_rounds.load(Ordering::Relaxed)));
    }
}
