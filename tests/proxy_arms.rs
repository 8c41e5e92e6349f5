//! Live experiments through the real binary: `sluice sim` replicas behind
//! `sluice serve` with a `[pools.experiment]`, traffic split between arms by
//! request, by header (session id) and by tenant; every response, lifecycle
//! record and the request/decision metrics carry the arm; a reload rebuilds
//! the arms; `sluice check` rejects broken experiments and names the key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "proxy_common/mod.rs"]
mod common;
#[path = "tenants_common/mod.rs"]
mod tenants;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, MODEL, Proxy, Sim, metric_value, sims, write_config};
use serde_json::Value;
use tenants::{Reply, chat, read_reply, sha256_hex};

/// POST a small chat request with optional API key and extra headers; expects a 200.
fn ask(addr: &str, key: Option<&str>, headers: &[(&str, &str)], request_id: &str) -> Reply {
    let r = ask_any(addr, key, headers, request_id);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r
}

/// Like [`ask`], whatever the status.
fn ask_any(addr: &str, key: Option<&str>, headers: &[(&str, &str)], request_id: &str) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut all = vec![("x-request-id", request_id)];
    all.extend(auth.iter().map(|a| ("Authorization", a.as_str())));
    all.extend_from_slice(headers);
    let body = chat(&format!("hello from {request_id}"), 2, false);
    let s = Client::new(addr).send_with_headers("POST", "/v1/chat/completions", &all, Some(&body));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    read_reply(s)
}

/// The arm a reply was labelled with.
fn arm_of(r: &Reply) -> String {
    r.header("x-sluice-arm")
        .unwrap_or_else(|| panic!("no x-sluice-arm in {:?}", r.headers))
        .to_string()
}

/// A one-pool config over `sims` with `extra` (the experiment) appended.
fn pool(sims: &[Sim], extra: &str) -> String {
    let eps: Vec<String> = sims.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!(
        "[[pools]]\nname = \"chat\"\nmodel = \"{MODEL}\"\nendpoints = [{}]\n\n{extra}",
        eps.join(", ")
    )
}

fn arms(split: &str, list: &[(&str, f64, &str)]) -> String {
    let mut s = format!("[pools.experiment]\n{split}\n");
    for (name, weight, policy) in list {
        s.push_str(&format!(
            "\n[[pools.experiment.arms]]\nname = \"{name}\"\nweight = {weight}\nrouting = {{ policy = \"{policy}\" }}\n"
        ));
    }
    s
}

/// Lifecycle records by request id.
fn records_by_id(p: &Proxy, n: usize) -> HashMap<String, Value> {
    p.records(n)
        .into_iter()
        .map(|r| (r["request_id"].as_str().unwrap().to_string(), r))
        .collect()
}

#[test]
fn request_split_follows_the_weights_and_labels_everything() {
    let sims = sims(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "exp.toml",
        &pool(
            &sims,
            &arms(
                "split_by = \"request\"",
                &[("base", 3.0, "round_robin"), ("alt", 1.0, "cache_aware")],
            ),
        ),
    );
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);

    const N: usize = 80;
    let mut by_id = HashMap::new();
    for i in 0..N {
        let id = format!("req-{i}");
        let r = ask(&p.api.addr, None, &[], &id);
        by_id.insert(id, arm_of(&r));
    }
    let alt = by_id.values().filter(|a| *a == "alt").count();
    let base = by_id.values().filter(|a| *a == "base").count();
    assert_eq!(alt + base, N, "{by_id:?}");
    // 3:1 → 20 of 80; the per-request sequence stays within a few of it.
    assert!((15..=25).contains(&alt), "alt got {alt} of {N}");

    // Lifecycle: every record names the arm its response did, and that arm's policy.
    let recs = records_by_id(&p, N);
    for (id, arm) in &by_id {
        let r = &recs[id];
        assert_eq!(r["arm"].as_str(), Some(arm.as_str()), "{r}");
        let policy = if arm == "alt" {
            "cache_aware"
        } else {
            "round_robin"
        };
        assert_eq!(r["policy"].as_str(), Some(policy), "{r}");
    }

    // Metrics: requests and decisions by arm.
    let m = p.admin.get("/metrics").text();
    let requests = |arm: &str| {
        metric_value(
            &m,
            &format!(
                "sluice_requests_total{{arm=\"{arm}\",class=\"default\",pool=\"chat\",status=\"200\"}}"
            ),
        )
    };
    assert_eq!(requests("alt"), Some(alt as f64), "{m}");
    assert_eq!(requests("base"), Some(base as f64), "{m}");
    assert_eq!(
        metric_value(
            &m,
            "sluice_routing_decisions_total{arm=\"base\",policy=\"round_robin\",pool=\"chat\",reason=\"rotation\"}"
        ),
        Some(base as f64),
        "{m}"
    );
    assert!(
        m.contains("sluice_routing_decisions_total{arm=\"alt\",policy=\"cache_aware\""),
        "{m}"
    );
    // Latency by arm, the comparison an experiment is for.
    assert_eq!(
        metric_value(
            &m,
            "sluice_e2e_request_latency_seconds_count{arm=\"alt\",pool=\"chat\"}"
        ),
        Some(alt as f64),
        "{m}"
    );

    // /admin/state: the arms, their shares and their own routers.
    let s = p.state();
    let exp = &s["pools"][0]["experiment"];
    assert_eq!(exp["split_by"], "request", "{s}");
    assert_eq!(exp["arms"][0]["name"], "base");
    assert_eq!(exp["arms"][0]["share"], 0.75);
    assert_eq!(exp["arms"][1]["routing"], "cache_aware");
    assert!(
        exp["arms"][1]["router_state_entries"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert_eq!(exp["arms"][0]["router_state_entries"], 0, "{s}");

    // A reload rebuilds the arms: drain `base`, add `new`.
    std::fs::write(
        &cfg,
        pool(
            &sims,
            &arms(
                "split_by = \"request\"",
                &[
                    ("base", 0.0, "round_robin"),
                    ("alt", 1.0, "cache_aware"),
                    ("new", 1.0, "least_requests"),
                ],
            ),
        ),
    )
    .unwrap();
    p.signal("HUP");
    p.wait_state("the reloaded arms", |s| {
        s["pools"][0]["experiment"]["arms"]
            .as_array()
            .is_some_and(|a| a.len() == 3)
    });
    let mut after = HashMap::<String, usize>::new();
    for i in 0..20 {
        let r = ask(&p.api.addr, None, &[], &format!("after-{i}"));
        *after.entry(arm_of(&r)).or_default() += 1;
    }
    assert_eq!(after.get("base"), None, "{after:?}");
    assert!(
        after.get("alt").is_some_and(|&n| (7..=13).contains(&n)),
        "{after:?}"
    );
    assert!(
        after.get("new").is_some_and(|&n| (7..=13).contains(&n)),
        "{after:?}"
    );
}

#[test]
fn header_split_is_sticky_per_session_with_the_example_config() {
    let sims = sims(2, &[]);
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/configs/experiment.toml"
    ))
    .unwrap();
    let eps = format!("endpoints = [\"{}\", \"{}\"]", sims[0].addr, sims[1].addr);
    let text = example.replace("endpoints = [\"127.0.0.1:8001\", \"127.0.0.1:8002\"]", &eps);
    assert!(text.contains(&eps), "the example's endpoints line changed");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "experiment.toml", &text);
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);

    let sessions: Vec<String> = (0..24).map(|i| format!("session-{i:02}")).collect();
    let mut first: HashMap<&str, String> = HashMap::new();
    for round in 0..3 {
        for s in &sessions {
            let r = ask(
                &p.api.addr,
                None,
                &[("x-session-id", s)],
                &format!("{s}-{round}"),
            );
            let arm = arm_of(&r);
            let was = first.entry(s).or_insert_with(|| arm.clone());
            assert_eq!(*was, arm, "session {s} moved arms");
        }
    }
    let cache = first.values().filter(|a| *a == "cache").count();
    let baseline = first.values().filter(|a| *a == "baseline").count();
    assert_eq!(cache + baseline, sessions.len(), "{first:?}");
    assert!(
        cache >= 1 && baseline >= 1,
        "one arm got every session: {first:?}"
    );
    // Without the header a request still gets an arm (per request).
    let r = ask(&p.api.addr, None, &[], "no-session");
    assert!(["baseline", "cache"].contains(&arm_of(&r).as_str()));
    let recs = records_by_id(&p, sessions.len() * 3 + 1);
    for (s, arm) in &first {
        assert_eq!(recs[&format!("{s}-2")]["arm"].as_str(), Some(arm.as_str()));
    }
    let s = p.state();
    assert_eq!(s["pools"][0]["experiment"]["split_by"], "header");
    assert_eq!(s["pools"][0]["experiment"]["header"], "x-session-id");
}

#[test]
fn tenant_split_is_sticky_per_tenant() {
    let sims = sims(1, &[]);
    let names: Vec<String> = (0..10).map(|i| format!("team{i}")).collect();
    let mut text = pool(
        &sims,
        &arms(
            "split_by = \"tenant\"\nsalt = \"t1\"",
            &[("a", 1.0, "round_robin"), ("b", 1.0, "least_requests")],
        ),
    );
    for n in &names {
        text.push_str(&format!(
            "\n[[tenants]]\nname = \"{n}\"\napi_key_sha256 = [\"{}\"]\n",
            sha256_hex(&format!("sk-{n}"))
        ));
    }
    // A tenant whose requests the proxy refuses after the arm is chosen (max_tokens 2 > cap 1).
    text.push_str(&format!(
        "\n[[tenants]]\nname = \"capped\"\napi_key_sha256 = [\"{}\"]\n[tenants.limits]\nmax_output_tokens = 1\n",
        sha256_hex("sk-capped")
    ));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "tenants.toml", &text);
    let p = Proxy::start(&["--config", cfg.to_str().unwrap()]);

    let mut arm_of_tenant: HashMap<&str, String> = HashMap::new();
    for round in 0..3 {
        for n in &names {
            let r = ask(
                &p.api.addr,
                Some(&format!("sk-{n}")),
                // A session header does not matter when the split is by tenant.
                &[("x-session-id", &format!("s{round}"))],
                &format!("{n}-{round}"),
            );
            let arm = arm_of(&r);
            let was = arm_of_tenant.entry(n).or_insert_with(|| arm.clone());
            assert_eq!(*was, arm, "tenant {n} moved arms");
        }
    }
    let a = arm_of_tenant.values().filter(|x| *x == "a").count();
    assert!((1..names.len()).contains(&a), "{arm_of_tenant:?}");
    // The proxy's own errors carry the arm too, once it was chosen.
    let refused: Vec<Reply> = (0..2)
        .map(|i| ask_any(&p.api.addr, Some("sk-capped"), &[], &format!("capped-{i}")))
        .collect();
    for r in &refused {
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-sluice-error"), Some("true"));
    }
    assert_eq!(arm_of(&refused[0]), arm_of(&refused[1]));
    let recs = records_by_id(&p, names.len() * 3 + 2);
    assert_eq!(
        recs["capped-0"]["arm"].as_str(),
        Some(arm_of(&refused[0]).as_str())
    );
    for r in recs.values().filter(|r| r["tenant"] != "capped") {
        let tenant = r["tenant"].as_str().unwrap();
        assert_eq!(
            r["arm"].as_str(),
            Some(arm_of_tenant[tenant].as_str()),
            "{r}"
        );
    }
}

fn check(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_explains_experiments_and_rejects_broken_ones() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/configs/experiment.toml"
    );
    let (ok, out) = check(std::path::Path::new(example));
    assert!(ok, "{out}");
    assert!(out.contains("by header `x-session-id`"), "{out}");
    assert!(
        out.contains(
            "arm `baseline`: weight 3 (75.0% of requests), routing least_requests (the pool's)"
        ),
        "{out}"
    );
    assert!(
        out.contains("arm `cache`: weight 1 (25.0% of requests), routing cache_aware (balance_abs_threshold = 8)"),
        "{out}"
    );

    let base = "[[pools]]\nname = \"chat\"\nmodel = \"m\"\nendpoints = [\"127.0.0.1:1\"]\n\n";
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 8] = [
        (
            "[pools.experiment]\n[[pools.experiment.arms]]\nname = \"a\"\nweight = 1\n[[pools.experiment.arms]]\nname = \"b\"\nweight = -2\n",
            &["line 1", "pools[0].experiment", "arms[1].weight", "-2"],
        ),
        (
            "[pools.experiment]\n[[pools.experiment.arms]]\nname = \"a\"\nweight = 0\n",
            &["line 1", "every weight is 0"],
        ),
        (
            "[pools.experiment]\narms = []\n",
            &["pools[0].experiment", "at least one"],
        ),
        (
            "[pools.experiment]\nsplit_by = \"header\"\n[[pools.experiment.arms]]\nname = \"a\"\nweight = 1\n",
            &["pools[0].experiment", "header", "x-session-id"],
        ),
        (
            "[pools.experiment]\n[[pools.experiment.arms]]\nname = \"a\"\nweight = 1\nwieght = 2\n",
            &["line 10", "wieght"],
        ),
        (
            "[pools.experiment]\nsplit_by = \"cookie\"\n[[pools.experiment.arms]]\nname = \"a\"\nweight = 1\n",
            &["line 7", "cookie"],
        ),
        (
            "[pools.experiment]\n[[pools.experiment.arms]]\nname = \"a\"\nweight = 1\nrouting = { policy = \"round_robin\", balance_abs_threshold = 4 }\n",
            &["arms[0].routing", "balance_abs_threshold", "cache_aware"],
        ),
        (
            "[pools.experiment]\nsplit_by = \"tenant\"\n[[pools.experiment.arms]]\nname = \"a\"\nweight = 1\n",
            &["line 1", "needs `[[tenants]]`"],
        ),
    ];
    for (i, (experiment, wants)) in cases.iter().enumerate() {
        let path = write_config(
            dir.path(),
            &format!("bad{i}.toml"),
            &format!("{base}{experiment}"),
        );
        let (ok, out) = check(&path);
        assert!(!ok, "accepted:\n{experiment}\n{out}");
        for w in *wants {
            assert!(out.contains(w), "case {i}: no {w:?} in: {out}");
        }
    }
    // `sluice serve` refuses it too, before listening.
    let bad = write_config(dir.path(), "serve.toml", &format!("{base}{}", cases[0].0));
    let started = Instant::now();
    let err = Proxy::try_start(&["--config", bad.to_str().unwrap()])
        .err()
        .expect("a bad experiment must not start");
    assert!(err.contains("arms[1].weight"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}
