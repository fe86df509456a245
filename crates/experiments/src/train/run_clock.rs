//! The run's wall clock, and the share of the CPU that the hypervisor took from this machine
//! meanwhile ("steal" time in Linux's `/proc/stat`). On a shared VM steal can take half the
//! cores' time with nothing else running on the machine (docs/perf.md, session 21), so a timed
//! run says what it had: `summary.json`'s `cpu_steal`.

use std::time::Instant;

/// Cumulative CPU time of all cores in clock ticks, from `/proc/stat`'s `cpu` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is part of user).
    pub total: u64,
    /// Time the hypervisor ran something else while this machine wanted a core.
    pub steal: u64,
}

impl CpuTimes {
    /// The counters now, or `None` where `/proc/stat` cannot be read or parsed (not Linux).
    pub fn now() -> Option<Self> {
        std::fs::read_to_string("/proc/stat").ok().and_then(|s| Self::parse(&s))
    }

    /// Parses the aggregate `cpu` line of a `/proc/stat` text: `cpu user nice system idle
    /// iowait irq softirq steal [guest guest_nice]`. `None` without one, or with fewer than the
    /// eight counters (kernels before 2.6.11 had no steal).
    pub fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let fields: Vec<u64> =
            line.split_whitespace().skip(1).take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        if fields.len() < 8 {
            return None;
        }
        Some(CpuTimes { total: fields.iter().sum(), steal: fields[7] })
    }

    /// The fraction of the CPU time from `self` to `later` that was stolen, in [0, 1]; `None`
    /// when no tick passed in between.
    pub fn steal_fraction_until(&self, later: &CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| (steal as f64 / total as f64).min(1.0))
    }
}

/// When a run started, and the CPU counters then.
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    started: Instant,
    cpu: Option<CpuTimes>,
}

impl RunClock {
    /// Starts the clock.
    pub fn start() -> Self {
        RunClock { started: Instant::now(), cpu: CpuTimes::now() }
    }

    /// Seconds since [`RunClock::start`].
    pub fn wall_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The fraction of all cores' time stolen by the hypervisor since the start (`None` where
    /// `/proc/stat` is unavailable).
    pub fn steal_fraction(&self) -> Option<f64> {
        self.cpu?.steal_fraction_until(&CpuTimes::now()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  1168539 0 70225 143310 410 0 286 13815 0 0\n\
                        cpu0 584000 0 35000 71000 200 0 140 6900 0 0\n\
                        intr 1 2 3\n";

    #[test]
    fn parses_the_aggregate_line_and_the_steal_between_two_readings() {
        let a = CpuTimes::parse(STAT).unwrap();
        assert_eq!(a, CpuTimes { total: 1168539 + 70225 + 143310 + 410 + 286 + 13815, steal: 13815 });
        let later = "cpu  1171630 0 70300 143900 410 0 290 17375 0 0\n";
        let b = CpuTimes::parse(later).unwrap();
        let f = a.steal_fraction_until(&b).unwrap();
        let want = 3560.0 / (b.total - a.total) as f64;
        assert!((f - want).abs() < 1e-12, "{f} vs {want}");
        assert_eq!(a.steal_fraction_until(&a), None, "no time passed");
        assert_eq!(b.steal_fraction_until(&a), None, "counters went backwards");
    }

    #[test]
    fn text_without_the_counters_is_none() {
        assert_eq!(CpuTimes::parse(""), None);
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8\n"), None, "a per-core line is not the aggregate");
        assert_eq!(CpuTimes::parse("cpu 1 2 3 4\n"), None, "too few counters");
        assert_eq!(CpuTimes::parse("cpu 1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn the_clock_reads_this_machine_where_it_can() {
        let clock = RunClock::start();
        assert!(clock.wall_seconds() >= 0.0);
        if let Some(f) = clock.steal_fraction() {
            assert!((0.0..=1.0).contains(&f), "{f}");
        }
    }
}
