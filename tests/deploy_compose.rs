//! deploy/compose.yaml and deploy/Dockerfile, checked without a Docker
//! engine: the services each profile starts, files every bind mount needs,
//! the proxy's config and where it finds the engines, Prometheus's and
//! Grafana's wiring, engine command lines that really start a replica (the
//! simulator's are run), GPU reservations, and the image's build stages.
//! Where the compose plugin is installed, `docker compose config` must also
//! accept the file for each profile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "deploy_common/mod.rs"]
mod deploy;
#[path = "sim_common/mod.rs"]
mod sim;

use std::collections::BTreeSet;
use std::process::Command;

use deploy::{read, repo, starts_with_args, toml_value, yaml};
use serde_yaml::Value;

fn compose() -> Value {
    yaml("deploy/compose.yaml")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("not a string: {x:?}"))
                .to_string()
        })
        .collect()
}

/// Service names a profile starts.
fn services_in(doc: &Value, profile: &str) -> BTreeSet<String> {
    doc["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, s)| strs(&s["profiles"]).iter().any(|p| p == profile))
        .map(|(k, _)| k.as_str().unwrap().to_string())
        .collect()
}

/// `${NAME:-default}` → `default`.
fn default_of(v: &str) -> String {
    v.strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .and_then(|r| r.split_once(":-"))
        .map_or(v.to_string(), |(_, d)| d.to_string())
}

/// (host path under deploy/, container path) of each bind mount.
fn binds(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let v = v.as_str()?;
            let mut parts = v.split(':');
            let host = parts.next()?;
            let target = parts.next()?;
            host.starts_with("./").then(|| {
                (
                    host.trim_start_matches("./").to_string(),
                    target.to_string(),
                )
            })
        })
        .collect()
}

/// The host file (under deploy/) a container path is mounted from.
fn host_file(service: &Value, container_path: &str) -> String {
    binds(service)
        .into_iter()
        .find_map(|(host, target)| {
            let rest = container_path.strip_prefix(&target)?;
            Some(format!("deploy/{host}{rest}"))
        })
        .unwrap_or_else(|| panic!("{container_path} is not mounted"))
}

fn aliases(service: &Value) -> Vec<String> {
    strs(&service["networks"]["default"]["aliases"])
}

#[test]
fn each_profile_starts_its_stack() {
    let doc = compose();
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        services_in(&doc, "sim"),
        set(&[
            "sluice",
            "sim-0",
            "sim-1",
            "sim-2",
            "redis",
            "prometheus",
            "grafana"
        ])
    );
    assert_eq!(
        services_in(&doc, "vllm"),
        set(&[
            "sluice",
            "vllm-0",
            "vllm-1",
            "redis",
            "prometheus",
            "grafana"
        ])
    );
    for (name, s) in doc["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        assert!(s["image"].as_str().is_some(), "{name}: no image");
        if !s["build"].is_null() {
            let context = repo("deploy").join(s["build"]["context"].as_str().unwrap());
            assert!(
                context
                    .join(s["build"]["dockerfile"].as_str().unwrap())
                    .is_file()
            );
        }
        for (host, _) in binds(s) {
            assert!(
                repo("deploy").join(&host).exists(),
                "{name} mounts missing ./{host}"
            );
        }
        // A dependency must run in every profile its dependant runs in.
        for dep in s["depends_on"].as_sequence().into_iter().flatten() {
            let dep = dep.as_str().unwrap();
            let theirs = strs(&doc["services"][dep]["profiles"]);
            for p in strs(&s["profiles"]) {
                assert!(
                    theirs.contains(&p),
                    "{name} depends on {dep}, absent from profile {p}"
                );
            }
        }
    }
}

#[test]
fn the_proxy_finds_every_engine_and_prometheus_scrapes_both() {
    let doc = compose();
    let sluice = &doc["services"]["sluice"];
    let args = strs(&sluice["command"]);
    assert_eq!(&args[..2], ["serve", "--config"]);
    let config_file = host_file(sluice, &args[2]);
    let config = read(&config_file);
    // The config check itself (with this service's environment) is in deploy_configs.rs.
    assert_eq!(config_file, "deploy/sluice/compose.toml");
    let env = sluice["environment"].as_mapping().unwrap();
    for var in config
        .lines()
        .filter(|l| l.trim_start().starts_with("api_key_env"))
        .flat_map(|l| {
            l.split('"')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
    {
        let v = env.get(var.as_str()).and_then(Value::as_str);
        assert!(
            v.is_some_and(|v| !default_of(v).is_empty()),
            "sluice service does not set {var}"
        );
    }
    let ports = strs(&sluice["ports"]);
    for key in ["listen", "admin_listen"] {
        let port = toml_value(&config, key)
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        assert!(
            ports.iter().any(|p| p.ends_with(&format!(":{port}"))),
            "{key} port {port} is not published: {ports:?}"
        );
    }

    // Engines: every replica of either profile carries the pool's DNS name.
    let dns = toml_value(&config, "dns").unwrap();
    let (host, port) = dns.split_once(':').unwrap();
    let model = toml_value(&config, "model").unwrap();
    let redis = toml_value(&config, "redis_url").unwrap();
    assert!(redis.starts_with("redis://redis:"), "{redis}");
    let mut devices = BTreeSet::new();
    for profile in ["sim", "vllm"] {
        let engines: Vec<String> = services_in(&doc, profile)
            .into_iter()
            .filter(|n| n.starts_with(profile))
            .collect();
        assert!(engines.len() >= 2, "{profile}: {engines:?}");
        for name in engines {
            let s = &doc["services"][name.as_str()];
            assert!(
                aliases(s).iter().any(|a| a == host),
                "{name} is not `{host}`"
            );
            let cmd = strs(&s["command"]);
            if profile == "sim" {
                assert_eq!(cmd[0], "sim");
                let i = cmd.iter().position(|a| a == "--port").unwrap();
                assert_eq!(cmd[i + 1], port);
                let i = cmd.iter().position(|a| a == "--model").unwrap();
                assert_eq!(cmd[i + 1], model);
                starts_with_args(&cmd);
            } else {
                assert!(
                    cmd.contains(&"--enable-prefix-caching".to_string()),
                    "{name}"
                );
                assert!(
                    cmd.contains(&format!("--served-model-name={model}")),
                    "{name}"
                );
                assert!(cmd.contains(&format!("--port={port}")), "{name}");
                let d = &s["deploy"]["resources"]["reservations"]["devices"][0];
                assert_eq!(d["driver"].as_str(), Some("nvidia"), "{name}");
                assert!(strs(&d["capabilities"]).contains(&"gpu".to_string()));
                for id in strs(&d["device_ids"]) {
                    assert!(devices.insert(id.clone()), "{name} shares GPU {id}");
                }
            }
        }
    }

    // Prometheus: the proxy's admin port and every engine, with the rules.
    let prom_svc = &doc["services"]["prometheus"];
    let cmd = strs(&prom_svc["command"]);
    let cfg_path = cmd
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .unwrap();
    let prom = yaml(&host_file(prom_svc, cfg_path));
    for rf in strs(&prom["rule_files"]) {
        let f = host_file(prom_svc, &rf);
        assert_eq!(f, "deploy/prometheus/rules.yaml");
    }
    let jobs = prom["scrape_configs"].as_sequence().unwrap();
    let admin_port = toml_value(&config, "admin_listen").unwrap();
    let admin_port = admin_port.rsplit(':').next().unwrap();
    assert!(jobs.iter().any(|j| {
        j["static_configs"][0]["targets"]
            .as_sequence()
            .is_some_and(|t| {
                t.iter()
                    .any(|t| t.as_str() == Some(&format!("sluice:{admin_port}")))
            })
    }));
    assert!(jobs.iter().any(|j| {
        let sd = &j["dns_sd_configs"][0];
        !sd.is_null()
            && strs(&sd["names"]).contains(&host.to_string())
            && sd["port"].as_u64() == port.parse().ok()
    }));

    // Grafana: the datasource is the stack's Prometheus; the dashboards are mounted.
    let grafana = &doc["services"]["grafana"];
    let ds = yaml(&host_file(
        grafana,
        "/etc/grafana/provisioning/datasources/prometheus.yaml",
    ));
    assert_eq!(
        ds["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let provider = yaml(&host_file(
        grafana,
        "/etc/grafana/provisioning/dashboards/sluice.yaml",
    ));
    let dir = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let dashboard = host_file(grafana, &format!("{dir}/sluice.json"));
    let d: serde_json::Value = serde_json::from_str(&read(&dashboard)).unwrap();
    assert_eq!(d["uid"].as_str(), Some("sluice-overview"));
    let home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .unwrap();
    assert_eq!(host_file(grafana, home), dashboard);
}

#[test]
fn docker_compose_config_accepts_each_profile() {
    let compose_cmd: Option<Vec<&str>> = if Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some(vec!["docker", "compose"])
    } else if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some(vec!["docker-compose"])
    } else {
        None
    };
    let Some(cmd) = compose_cmd else {
        eprintln!(
            "SKIPPED: neither `docker compose` nor `docker-compose` is installed; the structure was checked above"
        );
        return;
    };
    for profile in ["sim", "vllm"] {
        let out = Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("-f")
            .arg(repo("deploy/compose.yaml"))
            .args(["--profile", profile, "config", "-q"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} config ({profile}): {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_image_builds_dependencies_first_and_runs_sluice_as_non_root() {
    let text = read("deploy/Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let froms: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage");
    // The dependency layer comes before the sources are copied in the build stage.
    let cook = lines
        .iter()
        .position(|l| l.contains("cargo chef cook"))
        .expect("cook");
    let copy_all = (cook..lines.len())
        .find(|&i| lines[i] == "COPY . .")
        .expect("sources after the dependency layer");
    let build = (copy_all..lines.len())
        .find(|&i| lines[i].contains("cargo build --release"))
        .expect("build");
    assert!(lines[build].contains("--locked") && lines[build].contains("--bin sluice"));
    // The runtime stage: slim, the binary, a non-root user, `sluice` as entrypoint.
    let runtime = &lines[*froms.last().unwrap()..];
    assert!(runtime[0].contains("-slim"), "{}", runtime[0]);
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("COPY --from=build") && l.contains("sluice"))
    );
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user}"
    );
    let entry = runtime
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    assert!(entry.contains("sluice"), "{entry}");
    // Every file the image copies from the context exists and is not ignored.
    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context must skip target/"
    );
    for l in runtime.iter().filter(|l| l.starts_with("COPY fixtures/")) {
        let src = l.split_whitespace().nth(1).unwrap();
        assert!(repo(src).exists(), "{src}");
        assert!(
            !ignore
                .lines()
                .any(|i| i.trim().trim_end_matches('/') == src)
        );
    }
}
