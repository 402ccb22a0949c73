//! The files in deploy/ hold up: the systemd unit is sandboxed to an
//! exposure of 2.0 or lower ("OK") by `systemd-analyze security` and passes
//! `systemd-analyze verify`, the dashboard's and the alerts' age
//! expressions show nothing rather than nonsense while a gauge is still 0,
//! and the examples bind to loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The worst exposure the unit may have ("OK" in systemd-analyze's words).
const MAX_EXPOSURE: f64 = 2.0;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn unit() -> PathBuf {
    deploy().join("systemd/lobby-worker.service")
}

/// Runs `systemd-analyze ARGS`; fails the test, saying what to install,
/// when the tool is missing (this test must not pass without it).
fn systemd_analyze(args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run systemd-analyze ({err}): install systemd (Debian/Ubuntu: \
                 `apt-get install systemd`) to check deploy/systemd/lobby-worker.service"
            )
        })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The figure on the "Overall exposure level for ...: 1.1 OK" line.
fn overall_exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|line| line.contains("Overall exposure level"))?;
    let (_, verdict) = line.rsplit_once(": ")?;
    verdict.split_whitespace().next()?.parse().ok()
}

#[test]
fn the_overall_exposure_parser_reads_the_figure() {
    let report = "✓ UMask= Files created by service are accessible only by service's own user by default\n\n\
                  → Overall exposure level for lobby-worker.service: 1.1 OK 🙂\n";
    assert_eq!(overall_exposure(report), Some(1.1));
    assert_eq!(overall_exposure("no such line"), None);
}

/// `systemd-analyze security --offline=yes` rates the unit 2.0 or lower.
#[test]
fn the_systemd_unit_is_sandboxed_to_ok_or_better() {
    let unit = unit();
    let output = systemd_analyze(
        &[
            "security",
            "--offline=yes",
            "--no-pager",
            unit.to_str().unwrap(),
        ],
        &[],
    );
    let report = format!("{}{}", text(&output.stdout), text(&output.stderr));
    let exposure = overall_exposure(&report)
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    println!("[systemd] overall exposure {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    );
}

/// `systemd-analyze verify` finds nothing wrong with the unit but the
/// binary's absence from /usr/local/bin on this machine. Its
/// `Documentation=man:lobby-worker(1)` is checked against the page
/// `lobby-worker man` prints, installed in a scratch MANPATH (`man`, from
/// man-db, must be present for that).
#[test]
fn the_systemd_unit_verifies() {
    let man = common::worker("redis://127.0.0.1:1", &["man"]);
    assert!(
        man.status.success() && !man.stdout.is_empty(),
        "`lobby-worker man` failed: {}",
        text(&man.stderr)
    );
    let manpath = tempfile::tempdir().unwrap();
    std::fs::create_dir(manpath.path().join("man1")).unwrap();
    std::fs::write(manpath.path().join("man1/lobby-worker.1"), &man.stdout).unwrap();
    let unit = unit();
    let output = systemd_analyze(
        &["verify", unit.to_str().unwrap()],
        &[("MANPATH", manpath.path())],
    );
    let report = format!("{}{}", text(&output.stdout), text(&output.stderr));
    let binary_missing = !Path::new("/usr/local/bin/lobby-worker").exists();
    let complaints: Vec<&str> = report
        .lines()
        .filter(|line| line.contains("lobby-worker"))
        .filter(|line| {
            !(binary_missing && line.contains("/usr/local/bin/lobby-worker is not executable"))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains (exit {:?}):\n{}",
        output.status.code(),
        complaints.join("\n")
    );
    assert!(
        !report.contains("Command 'man"),
        "the man page is not found; is `man` (man-db) installed?\n{report}"
    );
}

/// Every string value named `expr` in `value`, however deep.
fn exprs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(expr) if key == "expr" => found.push(expr),
                    _ => exprs(value, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| exprs(item, found)),
        _ => {}
    }
}

/// The metric subtracted from `time()` in `expr`, when it does that.
fn age_metric(expr: &str) -> Option<String> {
    let compact: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let (_, after) = compact.split_once("time()-")?;
    let name: String = after
        .trim_start_matches('(')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
        .collect();
    Some(name)
}

/// Whether `expr`, taking `time() - metric`, also keeps only the series
/// whose `metric` is above 0 (`... and metric{...} > 0`): a gauge still 0
/// (never measured) then shows nothing instead of an age of over 50 years.
fn guards_zero(expr: &str, metric: &str) -> bool {
    let compact: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let Some((_, guard)) = compact.split_once(&format!("and{metric}")) else {
        return false;
    };
    // The selector's braces, then the comparison.
    let guard = match guard.strip_prefix('{') {
        Some(rest) => rest.split_once('}').map_or("", |(_, tail)| tail),
        None => guard,
    };
    guard.starts_with(">0")
}

#[test]
fn the_zero_guard_check_tells_guarded_from_unguarded() {
    let metric = "lobby_offset_timestamp_seconds";
    let unguarded = "time() - lobby_offset_timestamp_seconds{instance=~\"$instance\"}";
    let guarded = "(time() - lobby_offset_timestamp_seconds{instance=~\"$instance\"}) \
                   and lobby_offset_timestamp_seconds{instance=~\"$instance\"} > 0";
    assert_eq!(age_metric(unguarded).as_deref(), Some(metric));
    assert_eq!(age_metric(guarded).as_deref(), Some(metric));
    assert!(!guards_zero(unguarded, metric));
    assert!(guards_zero(guarded, metric));
    assert!(guards_zero(
        "time() - lobby_offset_timestamp_seconds and lobby_offset_timestamp_seconds > 0",
        metric
    ));
    assert!(!guards_zero(
        "time() - lobby_offset_timestamp_seconds and lobby_offset_timestamp_seconds >= 0",
        metric
    ));
    assert_eq!(age_metric("lobby_lag_seconds"), None);
}

/// Every dashboard expression of the form `time() - gauge` guards against
/// the gauge being 0 (not measured yet), and there is at least one.
#[test]
fn dashboard_ages_show_nothing_before_the_first_measurement() {
    let path = deploy().join("grafana/lobby-worker-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
    let mut found = Vec::new();
    exprs(&dashboard, &mut found);
    assert!(!found.is_empty(), "no expressions in {}", path.display());
    let ages: Vec<(&str, String)> = found
        .iter()
        .filter_map(|expr| age_metric(expr).map(|metric| (*expr, metric)))
        .collect();
    assert!(
        !ages.is_empty(),
        "no `time() -` expression in the dashboard (the offset age panel is gone?)"
    );
    for (expr, metric) in ages {
        assert!(
            guards_zero(expr, &metric),
            "`{expr}` plots now minus 0 while {metric} is unset: add `and {metric} > 0`"
        );
    }
}

/// The same for the alerting rules: an alert must not fire on an age
/// computed from a gauge that is still 0.
#[test]
fn alerts_do_not_fire_on_an_unmeasured_age() {
    let path = deploy().join("prometheus/lobby-worker-alerts.yml");
    let rules = std::fs::read_to_string(&path).unwrap();
    // Each rule's expression, a one-line `expr:` or a block after `expr: |`.
    let mut exprs = Vec::new();
    let mut lines = rules
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'));
    while let Some(line) = lines.next() {
        let Some((indent, rest)) = line.split_once("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let depth = indent.len();
            let mut block = String::new();
            for next in lines.by_ref() {
                if next.len() - next.trim_start().len() <= depth {
                    break;
                }
                block.push_str(next.trim());
                block.push(' ');
            }
            exprs.push(block);
        } else {
            exprs.push(rest.to_owned());
        }
    }
    assert!(exprs.len() >= 5, "too few rules read: {exprs:?}");
    for expr in &exprs {
        if let Some(metric) = age_metric(expr) {
            assert!(
                guards_zero(expr, &metric),
                "`{expr}` fires on now minus 0 while {metric} is unset: add `and {metric} > 0`"
            );
        }
    }
}

/// The examples in deploy/ serve the endpoints on loopback unless told
/// otherwise: no file binds every interface.
#[test]
fn deploy_examples_bind_to_loopback() {
    let mut files = vec![deploy()];
    let mut checked = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .unwrap()
                    .map(|entry| entry.unwrap().path()),
            );
            continue;
        }
        let content = std::fs::read_to_string(&path).unwrap();
        checked += 1;
        for every in ["0.0.0.0", "[::]:"] {
            assert!(
                !content.contains(every),
                "{} binds every interface ({every}): use 127.0.0.1",
                path.display()
            );
        }
        if content.contains("metrics-addr") || content.contains("METRICS_ADDR") {
            assert!(
                content.contains("127.0.0.1:9464"),
                "{} sets the metrics address but not to loopback",
                path.display()
            );
        }
    }
    assert!(checked >= 4, "only {checked} files under deploy/");
}
