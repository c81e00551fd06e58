//! `rationctl budget ...` against real 3-node clusters (in-process nodes, real
//! sockets): `set` changes only the limits it names and prints a diff,
//! `--replace-all`, `limit rm`, every field in the table, the JSON conventions
//! (numbers, ms times, snake_case, a lifetime window without an end), and errors
//! from the server printed once by the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ration_proto::v1;
use ration_testkit::inproc::Cluster;
use ration_testkit::{ledger, meta};
use serde_json::Value;

/// Runs rationctl in-process against `endpoints`; Ok(stdout) or Err(message).
async fn ctl(endpoints: &[SocketAddr], args: &[&str]) -> Result<String, String> {
    let eps: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let eps = eps.join(",");
    let mut argv = vec!["rationctl", "--endpoints", &eps, "--timeout-ms", "5000"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    match rationctl::run(argv, &mut out).await {
        Ok(()) => Ok(String::from_utf8(out).unwrap()),
        Err(e) => Err(format!("{e:#}")),
    }
}

async fn ok(endpoints: &[SocketAddr], args: &[&str]) -> String {
    ctl(endpoints, args).await.unwrap_or_else(|e| panic!("rationctl {args:?}: {e}"))
}

async fn json(endpoints: &[SocketAddr], args: &[&str]) -> Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    let out = ok(endpoints, &a).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rationctl {args:?} printed {out}: {e}"))
}

fn all(c: &Cluster) -> Vec<SocketAddr> {
    c.nodes.keys().map(|id| c.addrs[id]).collect()
}

/// The limits of a budget as (unit/window, cap, static allowance).
fn limits(b: &Value) -> Vec<(String, i64, Option<i64>)> {
    b["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                format!("{}/{}", l["unit"].as_str().unwrap(), l["window"].as_str().unwrap()),
                l["cap"].as_i64().unwrap(),
                l["static_allowance"].as_i64(),
            )
        })
        .collect()
}

fn lim(name: &str, cap: i64, static_allowance: Option<i64>) -> (String, i64, Option<i64>) {
    (name.to_owned(), cap, static_allowance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_changes_only_the_limits_it_names_and_prints_the_diff() {
    let c = Cluster::start(3, |_| {}).await;
    c.leader().await;
    let eps = all(&c);

    // A new budget: set creates it, every limit an addition.
    let out = ok(
        &eps,
        &[
            "budget",
            "set",
            "acme",
            "--limit",
            "tokens=1000000/day",
            "--limit",
            "usd_micros=50000000/month",
        ],
    )
    .await;
    assert!(out.starts_with("budget acme: created at version 1\n"), "{out}");
    assert!(out.contains("\n+ tokens 1000000/day\n+ usd_micros 50000000/month\n"), "{out}");

    // Naming one limit changes that one and keeps the dollar limit.
    let out = ok(&eps, &["budget", "set", "acme", "--limit", "tokens=2000000/day"]).await;
    assert!(
        out.starts_with("budget acme: version 1 -> 2\n~ tokens 1000000/day -> 2000000/day\n\n"),
        "{out}"
    );
    assert!(!out.contains("- usd_micros"), "{out}");
    let b = json(&eps, &["budget", "get", "acme"]).await;
    assert_eq!(
        limits(&b),
        [lim("tokens/day", 2_000_000, None), lim("usd_micros/month", 50_000_000, None)]
    );

    // A new (unit, window) is added; day+05:30 is another window than day.
    let out = ok(&eps, &["budget", "set", "acme", "--limit", "tokens=50000000/day+05:30"]).await;
    assert!(out.contains("\n+ tokens 50000000/day+05:30\n"), "{out}");
    assert_eq!(limits(&json(&eps, &["budget", "get", "acme"]).await).len(), 3);

    // The diff in JSON: numbers, snake_case, before and after.
    let w = json(
        &eps,
        &["budget", "set", "acme", "--limit", "usd_micros=60000000/month,static=1000000"],
    )
    .await;
    assert_eq!((w["previous_version"].as_u64(), w["version"].as_u64()), (Some(3), Some(4)), "{w}");
    let changes = w["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{w}");
    let ch = &changes[0];
    assert_eq!((ch["change"].as_str(), ch["unit"].as_str()), (Some("changed"), Some("usd_micros")));
    assert_eq!(ch["window"], "month");
    assert_eq!(ch["before"]["cap"], 50_000_000);
    assert_eq!(ch["before"]["on_unreachable"], "fail_closed");
    assert!(ch["before"]["static_allowance"].is_null());
    assert_eq!(ch["after"]["cap"], 60_000_000);
    assert_eq!(ch["after"]["on_unreachable"], "static");
    assert_eq!(ch["after"]["static_allowance"], 1_000_000);
    assert_eq!(w["limits"].as_array().unwrap().len(), 3, "{w}");

    // Setting what is already there writes, and says nothing changed.
    let out = ok(&eps, &["budget", "set", "acme", "--limit", "tokens=2000000/day"]).await;
    assert!(out.starts_with("budget acme: version 4 -> 5\n  (no limit changed)\n"), "{out}");

    // --replace-all: the named limits are the whole set (the old behaviour).
    let out =
        ok(&eps, &["budget", "set", "acme", "--limit", "tokens=3000000/day", "--replace-all"])
            .await;
    assert!(
        out.contains(
            "~ tokens 2000000/day -> 3000000/day\n\
             - tokens 50000000/day+05:30\n\
             - usd_micros 60000000/month,static=1000000\n"
        ),
        "{out}"
    );
    assert_eq!(
        limits(&json(&eps, &["budget", "get", "acme"]).await),
        [lim("tokens/day", 3_000_000, None)]
    );

    // limit rm: one limit goes, the others stay.
    ok(
        &eps,
        &["budget", "set", "acme", "--limit", "usd_micros=5000/month", "--limit", "tokens=9/hour"],
    )
    .await;
    let out = ok(&eps, &["budget", "limit", "rm", "acme", "usd_micros/month"]).await;
    assert!(out.starts_with("budget acme: version 7 -> 8\n- usd_micros 5000/month\n"), "{out}");
    assert_eq!(
        limits(&json(&eps, &["budget", "get", "acme"]).await),
        [lim("tokens/day", 3_000_000, None), lim("tokens/hour", 9, None)]
    );
    let w = json(&eps, &["budget", "limit", "remove", "acme", "tokens/hour"]).await;
    assert_eq!(w["changes"][0]["change"], "removed", "{w}");
    assert!(w["changes"][0]["after"].is_null(), "{w}");
    // ... and refuses clearly when there is no such limit (nothing is written).
    let err = ctl(&eps, &["budget", "limit", "rm", "acme", "usd_micros/month"]).await.unwrap_err();
    assert_eq!(err, "budget acme has no usd_micros/month limit (its limits: tokens/day)");
    let err = ctl(&eps, &["budget", "limit", "rm", "acme", "tokens/day+05:30"]).await.unwrap_err();
    assert!(err.contains("has no tokens/day+05:30 limit"), "{err}");
    let err = ctl(&eps, &["budget", "limit", "rm", "acme", "tokens=5/day"]).await.unwrap_err();
    assert!(err.contains("UNIT/WINDOW"), "{err}");
    let err = ctl(&eps, &["budget", "limit", "rm", "nope", "tokens/day"]).await.unwrap_err();
    assert_eq!(err, "budget nope does not exist");
    assert_eq!(json(&eps, &["budget", "get", "acme"]).await["version"], 9);

    // A limit named twice is refused before anything is sent.
    let err =
        ctl(&eps, &["budget", "set", "acme", "--limit", "tokens=1/day", "--limit", "tokens=2/day"])
            .await
            .unwrap_err();
    assert!(err.contains("tokens/day is given twice"), "{err}");
    // A stale expected version is refused; nothing changes.
    let err =
        ctl(&eps, &["budget", "set", "acme", "--limit", "tokens=1/day", "--expected-version", "3"])
            .await
            .unwrap_err();
    assert!(err.contains("budget acme is at version 9, not the expected 3"), "{err}");
    let out = ok(
        &eps,
        &["budget", "set", "acme", "--limit", "tokens=4000000/day", "--expected-version", "9"],
    )
    .await;
    assert!(out.starts_with("budget acme: version 9 -> 10\n"), "{out}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_table_and_json_show_every_field() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.addrs[&c.leader().await];
    let eps = all(&c);
    ok(
        &eps,
        &[
            "budget",
            "set",
            "acme",
            "--limit",
            "tokens=1000/day+05:30,static=50",
            "--limit",
            "tokens=5000/lifetime",
            "--limit",
            "credits=100/minute",
        ],
    )
    .await;
    ok(&eps, &["budget", "set", "acme/search", "--limit", "tokens=400/hour"]).await;

    // A held lease (outstanding, holders), an overrun, and a lease for the next
    // minute (upcoming).
    let mut l = ledger(leader);
    let held = l
        .acquire(v1::AcquireRequest {
            meta: meta("gw-a", 1, "gw-a"),
            budget: "acme/search".into(),
            unit: "tokens".into(),
            wanted: 30,
            min: 1,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.granted, 30);
    l.report_overrun(v1::OverrunRequest {
        meta: meta("gw-a", 2, "gw-a"),
        budget: "acme".into(),
        unit: "tokens".into(),
        amount: 7,
    })
    .await
    .unwrap();
    // Up to the table below, the figures read must be of one minute's window.
    ration_testkit::clear_of_a_minute_boundary(Duration::from_secs(10)).await;
    let now = l
        .acquire(v1::AcquireRequest {
            meta: meta("gw-b", 1, "gw-b"),
            budget: "acme".into(),
            unit: "credits".into(),
            wanted: 1,
            min: 1,
            ttl_ms: 1_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let next = l
        .acquire(v1::AcquireRequest {
            meta: meta("gw-b", 2, "gw-b"),
            budget: "acme".into(),
            unit: "credits".into(),
            wanted: 10,
            min: 1,
            ttl_ms: 180_000,
            starts_at_ms: now.window_end_ms.unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.granted, 10);

    // JSON: numbers as numbers, times in ms, snake_case enums, lifetime without end.
    let b = json(&eps, &["budget", "get", "acme"]).await;
    assert_eq!((b["version"].as_u64(), b["children"].as_u64()), (Some(1), Some(1)), "{b}");
    assert!(b["live_leases"].as_u64().unwrap() >= 1, "{b}");
    let by_window = |w: &str| {
        b["limits"].as_array().unwrap().iter().find(|l| l["window"] == w).unwrap().clone()
    };
    for l in b["limits"].as_array().unwrap() {
        for (k, v) in l.as_object().unwrap() {
            match k.as_str() {
                "unit" | "window" | "on_unreachable" => assert!(v.is_string(), "{k}: {v}"),
                "static_allowance" | "window_end_ms" => {
                    assert!(v.is_null() || v.is_u64(), "{k}: {v}")
                }
                _ => assert!(v.is_number(), "{k} is not a number: {v}"),
            }
        }
    }
    let day = by_window("day+05:30");
    assert_eq!((day["cap"].as_i64(), day["on_unreachable"].as_str()), (Some(1000), Some("static")));
    assert_eq!(day["static_allowance"], 50);
    // The lease on acme/search counts on acme too; the overrun is consumed.
    assert_eq!((day["outstanding"].as_i64(), day["holders"].as_u64()), (Some(30), Some(1)));
    assert_eq!((day["overruns"].as_i64(), day["consumed"].as_i64()), (Some(7), Some(7)));
    assert_eq!(day["remaining"], 1000 - 30 - 7);
    let (start, end) =
        (day["window_start_ms"].as_u64().unwrap(), day["window_end_ms"].as_u64().unwrap());
    assert_eq!(end - start, 86_400_000);
    // A day at UTC+05:30 starts at 18:30 UTC.
    assert_eq!(start % 86_400_000, (18 * 60 + 30) * 60_000);
    let life = by_window("lifetime");
    assert_eq!(life["on_unreachable"], "fail_closed");
    assert!(life["static_allowance"].is_null(), "{life}");
    assert_eq!(life["window_start_ms"], 0);
    assert!(life["window_end_ms"].is_null(), "{life}");
    assert_eq!(by_window("minute")["upcoming"], 10, "a lease for the next minute is upcoming");

    // The table: every field, the static allowance, the windows.
    let table = ok(&eps, &["budget", "get", "acme"]).await;
    let lines: Vec<&str> = table.lines().collect();
    for column in [
        "BUDGET",
        "VERSION",
        "CHILDREN",
        "LEASES",
        "UNIT",
        "WINDOW",
        "CAP",
        "ON UNREACHABLE",
        "CONSUMED",
        "OUTSTANDING",
        "UPCOMING",
        "REMAINING",
        "OVERRUNS",
        "HOLDERS",
        "WINDOW START",
        "WINDOW END",
    ] {
        assert!(lines[0].contains(column), "{table}");
    }
    let row = |w: &str| -> Vec<&str> {
        lines
            .iter()
            .find(|l| l.split_whitespace().any(|c| c == w))
            .unwrap()
            .split_whitespace()
            .collect()
    };
    let day = row("day+05:30");
    assert!(day.contains(&"static=50") && day.contains(&"963") && day.contains(&"30"), "{table}");
    assert!(day.iter().any(|c| c.ends_with("T18:30:00.000Z")), "{table}");
    let life = row("lifetime");
    assert!(life.contains(&"fail_closed") && life.ends_with(&["-", "never"]), "{table}");
    assert!(row("minute").contains(&"10"), "{table}");
    let tree = ok(&eps, &["budget", "list"]).await;
    assert!(tree.contains("static=50") && tree.contains("└─ search"), "{tree}");
    let listed = json(&eps, &["budget", "list"]).await;
    let declared = |b: &Value| -> Vec<Value> {
        b["limits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let keep = ["unit", "window", "cap", "on_unreachable", "static_allowance"];
                keep.iter().map(|k| l[*k].clone()).collect()
            })
            .collect()
    };
    assert_eq!(declared(&listed[0]), declared(&b), "list and get agree");
    c.shutdown().await;
}

/// Runs the real binary; (exit code, stdout, stderr).
async fn rationctl(endpoints: String, args: &[&str]) -> (Option<i32>, String, String) {
    let mut argv = vec!["--endpoints".to_owned(), endpoints, "--timeout-ms".into(), "5000".into()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_rationctl")).args(argv).output().unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_error_from_the_server_is_printed_once() {
    let c = Cluster::start(3, |_| {}).await;
    c.leader().await;
    let eps: Vec<String> = all(&c).iter().map(|a| a.to_string()).collect();
    let eps = eps.join(",");
    let run = |args: &'static [&'static str]| rationctl(eps.clone(), args);
    assert_eq!(run(&["budget", "set", "acme", "--limit", "tokens=10/day"]).await.0, Some(0));
    assert_eq!(run(&["budget", "set", "acme/x", "--limit", "tokens=10/day"]).await.0, Some(0));

    // One line: the code as gRPC spells it, then the server's message, once; the
    // budget is named in front only when the message does not name it.
    for (args, want) in [
        (
            &["budget", "delete", "acme"][..],
            "error: FAILED_PRECONDITION: budget acme has 1 child budget(s); delete them first\n",
        ),
        (
            &["budget", "delete", "acme/x", "--expected-version", "9"][..],
            "error: ABORTED: budget acme/x is at version 1, not the expected 9; re-read it and retry\n",
        ),
        (
            &["budget", "set", "acme", "--limit", "tokens=10/day,static=500"][..],
            "error: budget acme: INVALID_ARGUMENT: invalid on_unreachable.static_allowance: \
             static allowance 500 is above the cap 10 of tokens per day\n",
        ),
        (
            &["budget", "set", "nowhere/x", "--limit", "tokens=1/day"][..],
            "error: FAILED_PRECONDITION: parent budget nowhere of nowhere/x does not exist; \
             create it first\n",
        ),
    ] {
        let (code, stdout, stderr) = rationctl(eps.clone(), args).await;
        assert_eq!((code, stdout.as_str(), stderr.as_str()), (Some(1), "", want), "{args:?}");
    }

    // No endpoint answers: each cause is said once, after the endpoints.
    let dead: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        })
        .collect();
    let (code, _, stderr) = rationctl(dead.join(","), &["budget", "get", "acme"]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "error: budget acme: no endpoint answered: {}, {}: UNAVAILABLE: ",
            dead[0], dead[1]
        )),
        "{stderr}"
    );
    assert_eq!(stderr.matches("UNAVAILABLE").count(), 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    c.shutdown().await;
}

/// Issue #20: `budget template set|get|delete`, `budget freeze|unfreeze`, the
/// `concurrent` window, and how a budget shows a template, an instance and a hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn templates_and_freezes_are_set_shown_and_removed() {
    let c = Cluster::start(3, |_| {}).await;
    let eps = all(&c);
    ok(&eps, &["budget", "set", "acme", "--limit", "usd_micros=1000000/month"]).await;
    let t = json(
        &eps,
        &[
            "budget",
            "template",
            "set",
            "acme",
            "--limit",
            "tokens=100/minute",
            "--limit",
            "inflight=2/concurrent",
            "--max-instances",
            "50",
            "--idle",
            "2h",
            "--max-duration",
            "30m",
            "--guard",
            "tokens=40/10s",
        ],
    )
    .await;
    assert_eq!(t["limits"], serde_json::json!(["tokens=100/minute", "inflight=2/concurrent"]));
    assert_eq!((t["max_instances"].as_u64(), t["idle_ms"].as_u64()), (Some(50), Some(7_200_000)));
    assert_eq!(t["max_duration_ms"].as_u64(), Some(1_800_000));
    assert_eq!(t["guards"], serde_json::json!(["tokens=40/10s"]));
    assert_eq!((t["instances"].as_u64(), t["rewritten"].as_u64()), (Some(0), Some(0)));
    // The first acquire on acme/alice makes it.
    let addr = c.addrs[&c.leader().await];
    ledger(addr)
        .acquire(v1::AcquireRequest {
            meta: meta("cli-test", 1, "gw"),
            budget: "acme/alice".into(),
            unit: "tokens".into(),
            wanted: 10,
            min: 1,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap();
    let b = json(&eps, &["budget", "get", "acme/alice"]).await;
    assert_eq!(b["instance"], true);
    assert_eq!(limits(&b), [lim("tokens/minute", 100, None), lim("inflight/concurrent", 2, None)]);
    assert_eq!(b["limits"][1]["window_end_ms"], Value::Null, "units in flight never roll");
    let text = ok(&eps, &["budget", "get", "acme"]).await;
    assert!(
        text.contains("acme (template)") && text.contains("1 of at most 50 instances"),
        "{text}"
    );
    // Money as money in tables (usd_micros=1000000 is one dollar); JSON keeps integers.
    assert!(text.contains("usd_micros  month   $1.00"), "{text}");
    let j = json(&eps, &["budget", "get", "acme"]).await;
    assert_eq!(j["limits"][0]["cap"].as_i64(), Some(1_000_000));
    assert!(text.contains("runaway guard: tokens=40/10s"), "{text}");
    // Freeze: said once, with what live leases hold; unfreeze.
    let f = json(&eps, &["budget", "freeze", "acme/alice"]).await;
    assert_eq!((f["frozen"].as_bool(), f["changed"].as_bool()), (Some(true), Some(true)));
    assert_eq!(f["held"]["tokens"].as_i64(), Some(10));
    let text = ok(&eps, &["budget", "freeze", "acme/alice"]).await;
    assert!(text.contains("already frozen"), "{text}");
    let b = json(&eps, &["budget", "get", "acme/alice"]).await;
    assert_eq!(
        (b["frozen"].as_bool(), b["hold"].as_str()),
        (Some(true), Some("frozen by an operator"))
    );
    ok(&eps, &["budget", "unfreeze", "acme/alice"]).await;
    // Bad input: a clear error, naming the field.
    let e = ctl(
        &eps,
        &["budget", "template", "set", "acme", "--limit", "t=1/day", "--max-instances", "0"],
    )
    .await
    .unwrap_err();
    assert!(e.contains("INVALID_ARGUMENT") && e.contains("max_instances"), "{e}");
    let e =
        ctl(&eps, &["budget", "template", "set", "acme", "--limit", "t=1/day", "--guard", "t=5"])
            .await
            .unwrap_err();
    assert!(e.contains("bad guard"), "{e}");
    let e = ctl(&eps, &["budget", "delete", "acme"]).await.unwrap_err();
    assert!(e.contains("FAILED_PRECONDITION"), "{e}");
    let d = json(&eps, &["budget", "template", "delete", "acme"]).await;
    assert_eq!(d["instances_kept"].as_u64(), Some(1));
    let e = ctl(&eps, &["budget", "template", "get", "acme"]).await.unwrap_err();
    assert!(e.contains("has no template"), "{e}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prices_options_forecasts_and_traces_from_the_command_line() {
    let c = Cluster::start(3, |_| {}).await;
    let eps = all(&c);
    // Prices in dollars per million tokens; versions in order.
    let v1 =
        json(&eps, &["price", "set", "gpt-x", "--input-price", "2.50", "--output-price", "10"])
            .await;
    assert_eq!(v1["version"], 1);
    let later =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            + 3_600_000)
            .to_string();
    let v2 = json(
        &eps,
        &[
            "price",
            "set",
            "gpt-x",
            "--input-price",
            "1.25",
            "--cached-price",
            "0.125",
            "--output-price",
            "5",
            "--effective-from",
            &later,
        ],
    )
    .await;
    assert_eq!(v2["version"], 2);
    let list = json(&eps, &["price", "list"]).await;
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 2, "the version in force and the one to come: {list}");
    assert_eq!(
        (rows[0]["input"].as_i64(), rows[0]["in_force"].as_bool()),
        (Some(2_500_000), Some(true))
    );
    assert_eq!(rows[0]["cached_input"], 2_500_000, "cached input defaults to the input price");
    let table = ok(&eps, &["-o", "table", "price", "history", "gpt-x"]).await;
    assert!(
        table.contains("$2.50") && table.contains("$0.125") && table.contains("upcoming"),
        "{table}"
    );
    // Out of order, bad amounts and unknown models are refused with the reason.
    let past = ctl(
        &eps,
        &[
            "price",
            "set",
            "gpt-x",
            "--input-price",
            "1",
            "--output-price",
            "1",
            "--effective-from",
            "1000",
        ],
    )
    .await;
    assert!(past.unwrap_err().contains("versions take effect in order"));
    let err2 =
        ctl(&eps, &["price", "set", "gpt-x", "--input-price", "1.0000001", "--output-price", "1"])
            .await;
    assert!(err2.unwrap_err().contains("six decimals"));
    assert!(ctl(&eps, &["price", "history", "nope"]).await.unwrap_err().contains("no price"));

    // Thresholds and shadow mode; shown by budget get.
    ok(&eps, &["budget", "set", "team", "--limit", "tokens=1000/day"]).await;
    let o = json(
        &eps,
        &["budget", "options", "team", "--threshold", "50,80", "--threshold", "100", "--shadow"],
    )
    .await;
    assert_eq!(o["thresholds_pct"], serde_json::json!([50, 80, 100]));
    let b = json(&eps, &["budget", "get", "team"]).await;
    assert_eq!(
        (b["thresholds_pct"].clone(), b["shadow"].clone()),
        (serde_json::json!([50, 80, 100]), serde_json::json!(true))
    );
    let t = ok(&eps, &["-o", "table", "budget", "get", "team"]).await;
    assert!(t.contains("alert thresholds: 50%, 80%, 100%") && t.contains("shadow mode"), "{t}");
    let bad = ctl(&eps, &["budget", "options", "team", "--threshold", "0"]).await.unwrap_err();
    assert!(bad.contains("thresholds_pct"), "{bad}");
    ok(&eps, &["budget", "options", "team"]).await;
    assert_eq!(json(&eps, &["budget", "get", "team"]).await["shadow"], false);

    // A forecast with no spend yet.
    let f = json(&eps, &["budget", "forecast", "team"]).await;
    assert_eq!(f["limits"][0]["rate_per_s"], 0.0);
    assert!(f["limits"][0]["exhausts_at_ms"].is_null());
    let t = ok(&eps, &["-o", "table", "budget", "forecast", "team"]).await;
    assert!(t.contains("no spend lately"), "{t}");

    // Audit records by trace id and client id.
    let mut l = ration_testkit::ledger(eps[0]);
    l.record_call(ration_proto::v1::RecordCallRequest {
        meta: ration_testkit::meta("agent-7", 1, "gw"),
        budget: "team".into(),
        trace: "run-42".into(),
        usage: Some(ration_proto::v1::UsageLine {
            model: "gpt-x".into(),
            price_version: 1,
            calls: 1,
            input_tokens: 10,
            cached_tokens: 0,
            output_tokens: 5,
            cost_usd_micros: 75,
        }),
    })
    .await
    .unwrap();
    let q = json(&eps, &["audit", "query", "--trace", "run-42"]).await;
    let records = q.as_array().unwrap_or_else(|| panic!("{q}"));
    assert_eq!(records.len(), 1, "{q}");
    assert_eq!(records[0]["kind"], "call_recorded");
    let by_client = json(&eps, &["audit", "query", "--client-id", "agent-7"]).await;
    assert_eq!(by_client.as_array().unwrap().len(), 1, "{by_client}");
    let t = ok(&eps, &["-o", "table", "audit", "query", "--trace", "run-42"]).await;
    assert!(
        t.contains("call run-42: gpt-x v1 10+0+5 tokens $0.000075") && t.contains("agent-7#1"),
        "{t}"
    );
    c.shutdown().await;
}
