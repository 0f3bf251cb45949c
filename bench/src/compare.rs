//! Before-and-after comparison of two builds (`cim-ab`): runs the same `cim-bench` command with
//! each build's binaries in turn, pair after pair, and summarises each figure per build and as
//! the ratio within each pair. This box's speed drifts by a third within the hour, so only
//! runs made side by side compare; a ratio taken inside a pair cancels most of the drift, and
//! the cluster's CPU over the harness's cancels what is left (both share the cores).

use serde_json::Value;

use crate::run::Scenario;

/// Whether a larger value of a figure is the better one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// A figure read from `cim-bench --json`.
pub struct Figure {
    /// Label in the summary.
    pub name: &'static str,
    /// Which way is better.
    pub better: Better,
    /// Reads the figure from one run's report; `None` where the scenario has none.
    pub read: fn(&Value) -> Option<f64>,
}

fn number(report: &Value, key: &str) -> Option<f64> {
    report.get(key)?.as_f64()
}

fn latency(report: &Value, key: &str) -> Option<f64> {
    // Scenarios without messages report all-zero latencies.
    number(report, "delivered")
        .filter(|d| *d > 0.0)
        .and(report.get("latency_us")?.get(key)?.as_f64())
}

fn cpu_ratio(report: &Value, cluster: &str, harness: &str) -> Option<f64> {
    Some(number(report, cluster)? / number(report, harness).filter(|h| *h > 0.0)?)
}

/// The figures `cim-ab` compares, in the order it prints them.
pub const FIGURES: &[Figure] = &[
    Figure {
        name: "delivered/s",
        better: Better::Higher,
        read: |r| number(r, "msgs_per_sec").filter(|v| *v > 0.0),
    },
    Figure {
        name: "logins/s",
        better: Better::Higher,
        read: |r| number(r, "logins_per_sec"),
    },
    Figure {
        name: "server bytes/conn",
        better: Better::Lower,
        read: |r| number(r, "server_rss_bytes_per_conn"),
    },
    Figure {
        name: "e2e p50 ms",
        better: Better::Lower,
        read: |r| latency(r, "p50").map(|us| us / 1000.0),
    },
    Figure {
        name: "e2e p99 ms",
        better: Better::Lower,
        read: |r| latency(r, "p99").map(|us| us / 1000.0),
    },
    Figure {
        name: "cluster us/msg",
        better: Better::Lower,
        read: |r| number(r, "cluster_cpu_us_per_msg"),
    },
    Figure {
        name: "harness us/msg",
        better: Better::Lower,
        read: |r| number(r, "harness_cpu_us_per_msg"),
    },
    Figure {
        name: "cluster/harness CPU",
        better: Better::Lower,
        read: |r| cpu_ratio(r, "cluster_cpu_us_per_msg", "harness_cpu_us_per_msg"),
    },
    Figure {
        name: "cluster us/login",
        better: Better::Lower,
        read: |r| number(r, "cluster_cpu_us_per_login"),
    },
    Figure {
        name: "harness us/login",
        better: Better::Lower,
        read: |r| number(r, "harness_cpu_us_per_login"),
    },
    Figure {
        name: "cluster/harness CPU (login)",
        better: Better::Lower,
        read: |r| cpu_ratio(r, "cluster_cpu_us_per_login", "harness_cpu_us_per_login"),
    },
    Figure {
        name: "client datagrams/msg",
        better: Better::Lower,
        read: |r| number(r, "client_datagrams_per_msg"),
    },
];

/// Whether pair number `pair` (from 1) runs the before build first: odd pairs do, even ones
/// run the after build first, so a box that speeds up or slows down favours neither.
pub fn before_runs_first(pair: u64) -> bool {
    pair % 2 == 1
}

/// A pair's reports as (before, after), from the order they ran in.
pub fn as_pair(first: Value, second: Value, before_first: bool) -> (Value, Value) {
    if before_first {
        (first, second)
    } else {
        (second, first)
    }
}

/// What makes one run's report a failure, each said in a few words: lost, duplicated or
/// misdelivered deliveries, failed sends, a messaging run that sent nothing, failover victims
/// that never came back. Empty for a good run. (Reports of older builds lack some fields:
/// those count as 0.)
pub fn faults(report: &Value) -> Vec<String> {
    let count = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64).unwrap_or(0);
    let mut faults: Vec<String> = [
        ("lost", "lost deliveries"),
        ("duplicated", "duplicated deliveries"),
        ("misdelivered", "deliveries to the wrong client"),
        ("send_errors", "failed sends"),
    ]
    .iter()
    .filter_map(|(key, what)| {
        let n = count(report, key);
        (n > 0).then(|| format!("{n} {what}"))
    })
    .collect();
    let messaging = report
        .get("scenario")
        .and_then(Value::as_str)
        .and_then(Scenario::from_name)
        .is_some_and(Scenario::sends_messages);
    if messaging && count(report, "sent") == 0 {
        faults.push("nothing sent".into());
    }
    // A report without a failover holds `null` there, which reads as 0 victims.
    let failover = &report["failover"];
    let missing = count(failover, "victims").saturating_sub(count(failover, "recovered"));
    if missing > 0 {
        faults.push(format!("{missing} failover clients never came back"));
    }
    faults
}

/// Median, smallest and largest of some values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// One figure over all pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: &'static str,
    pub before: Spread,
    pub after: Spread,
    /// after / before within each pair (`None` if every before value was 0).
    pub ratio: Option<Spread>,
    /// Pairs in which the after build did better.
    pub after_better: usize,
    /// Pairs with the figure in both runs.
    pub pairs: usize,
}

/// Summarises `(before, after)` reports, one pair each, for every figure both runs of at
/// least one pair have.
pub fn summarise(pairs: &[(Value, Value)]) -> Vec<Row> {
    FIGURES
        .iter()
        .filter_map(|figure| {
            let both: Vec<(f64, f64)> = pairs
                .iter()
                .filter_map(|(b, a)| Some(((figure.read)(b)?, (figure.read)(a)?)))
                .collect();
            let before: Vec<f64> = both.iter().map(|(b, _)| *b).collect();
            let after: Vec<f64> = both.iter().map(|(_, a)| *a).collect();
            let ratios: Vec<f64> = both
                .iter()
                .filter(|(b, _)| *b != 0.0)
                .map(|(b, a)| a / b)
                .collect();
            let after_better = both
                .iter()
                .filter(|(b, a)| match figure.better {
                    Better::Higher => a > b,
                    Better::Lower => a < b,
                })
                .count();
            Some(Row {
                name: figure.name,
                before: Spread::of(&before)?,
                after: Spread::of(&after)?,
                ratio: Spread::of(&ratios),
                after_better,
                pairs: both.len(),
            })
        })
        .collect()
}

/// A value for the summary: few digits for small figures, none for large ones.
pub fn show(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn show_spread(s: &Spread) -> String {
    format!("{} ({}-{})", show(s.median), show(s.min), show(s.max))
}

/// The summary as a Markdown table (pasteable into BENCHMARKS.md).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | before: median (range) | after: median (range) | after / before per pair | after better |\n|---|---|---|---|---|\n",
    );
    for row in rows {
        let ratio = row.ratio.map_or_else(
            || "-".to_string(),
            |r| format!("{:.3} ({:.3}-{:.3})", r.median, r.min, r.max),
        );
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} of {} |\n",
            row.name,
            show_spread(&row.before),
            show_spread(&row.after),
            ratio,
            row.after_better,
            row.pairs,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn private(rate: f64, cluster: f64, harness: f64, p99_us: u64) -> Value {
        json!({
            "scenario": "private", "sent": 1000, "delivered": 1000, "lost": 0, "duplicated": 0,
            "msgs_per_sec": rate, "logins_per_sec": null,
            "latency_us": {"p50": 1000, "p99": p99_us},
            "cluster_cpu_us_per_msg": cluster, "harness_cpu_us_per_msg": harness,
        })
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        let odd = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn pairs_are_compared_within_themselves() {
        // A box that slows down between pairs: the second pair is slower for both builds,
        // but the after build is 10% faster in each pair.
        let pairs = vec![
            (
                private(1000.0, 100.0, 50.0, 4000),
                private(1100.0, 90.0, 50.0, 3000),
            ),
            (
                private(500.0, 200.0, 100.0, 9000),
                private(550.0, 180.0, 100.0, 8000),
            ),
        ];
        let rows = summarise(&pairs);
        let rate = rows.iter().find(|r| r.name == "delivered/s").unwrap();
        assert!((rate.ratio.unwrap().median - 1.1).abs() < 1e-9, "{rate:?}");
        assert_eq!((rate.after_better, rate.pairs), (2, 2));
        let ratio = rows
            .iter()
            .find(|r| r.name == "cluster/harness CPU")
            .unwrap();
        assert!((ratio.before.median - 2.0).abs() < 1e-9);
        assert!((ratio.after.median - 1.8).abs() < 1e-9);
        assert_eq!(ratio.after_better, 2, "lower CPU is better");
        let p99 = rows.iter().find(|r| r.name == "e2e p99 ms").unwrap();
        assert_eq!((p99.before.min, p99.before.max), (4.0, 9.0));
        assert!(
            rows.iter().all(|r| r.name != "logins/s"),
            "figures a scenario lacks are left out"
        );
    }

    #[test]
    fn a_login_storm_has_no_latency_row() {
        let login = |rate: f64| {
            json!({"scenario": "login", "delivered": 0, "lost": 0, "duplicated": 0,
                "msgs_per_sec": 0.0, "logins_per_sec": rate,
                "latency_us": {"p50": 0, "p99": 0}})
        };
        let rows = summarise(&[(login(1000.0), login(900.0))]);
        let names: Vec<_> = rows.iter().map(|r| r.name).collect();
        assert_eq!(names, ["logins/s"]);
        assert_eq!(rows[0].after_better, 0);
    }

    #[test]
    fn pairs_alternate_which_build_runs_first() {
        let order: Vec<bool> = (1..=4).map(before_runs_first).collect();
        assert_eq!(order, [true, false, true, false]);
        let (before, after) = (json!("before"), json!("after"));
        assert_eq!(
            as_pair(before.clone(), after.clone(), true),
            (before.clone(), after.clone())
        );
        assert_eq!(
            as_pair(after.clone(), before.clone(), false),
            (before, after)
        );
    }

    #[test]
    fn a_figure_that_was_zero_before_keeps_its_row() {
        let idle = |bytes: f64| json!({"server_rss_bytes_per_conn": bytes});
        let rows = summarise(&[(idle(0.0), idle(100.0))]);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].ratio, None);
        assert!(table(&rows).contains("| - |"), "{}", table(&rows));
    }

    #[test]
    fn lost_duplicated_misdelivered_and_unsent_are_faults() {
        assert!(faults(&private(1.0, 1.0, 1.0, 1)).is_empty());
        assert_eq!(
            faults(&json!({"scenario": "private", "sent": 5, "lost": 2, "duplicated": 1})),
            ["2 lost deliveries", "1 duplicated deliveries"]
        );
        assert_eq!(
            faults(&json!({"scenario": "group", "sent": 5, "misdelivered": 3, "send_errors": 1})),
            ["3 deliveries to the wrong client", "1 failed sends"]
        );
        assert_eq!(
            faults(&json!({"scenario": "private", "sent": 0})),
            ["nothing sent"]
        );
        // A login storm sends nothing, as it should.
        assert!(faults(&json!({"scenario": "login", "sent": 0})).is_empty());
        assert_eq!(
            faults(&json!({"scenario": "failover", "failover": {"victims": 4, "recovered": 3}})),
            ["1 failover clients never came back"]
        );
    }
}
