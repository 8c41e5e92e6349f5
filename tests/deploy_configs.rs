//! The configs shipped in `deploy/` must stay valid as the config format evolves:
//! each goes through `sluice check`, the same validation `sluice serve` does,
//! with the tenant-key environment its deployment gives it (compose's
//! `environment`, the Kubernetes Secret) — so a key variable the config names
//! but the deployment does not set fails here, not at a pod's start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "deploy_common/mod.rs"]
mod deploy;
#[path = "sim_common/mod.rs"]
mod sim;

use deploy::{check, read, repo};

/// `${NAME:-default}` → `default`; anything else as it is.
fn compose_default(v: &str) -> String {
    match v
        .strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .and_then(|r| r.split_once(":-"))
    {
        Some((_, default)) => default.to_string(),
        None => v.to_string(),
    }
}

/// The `sluice` service's environment in deploy/compose.yaml, defaults filled in.
fn compose_env() -> Vec<(String, String)> {
    let doc: serde_yaml::Value = serde_yaml::from_str(&read("deploy/compose.yaml")).unwrap();
    doc["services"]["sluice"]["environment"]
        .as_mapping()
        .expect("sluice service environment")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                compose_default(v.as_str().unwrap()),
            )
        })
        .collect()
}

/// The tenant-key Secret's `stringData` in deploy/k8s/base/secret.yaml.
fn secret_env() -> Vec<(String, String)> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/k8s/base/secret.yaml")).unwrap();
    assert_eq!(doc["kind"].as_str(), Some("Secret"));
    doc["stringData"]
        .as_mapping()
        .expect("stringData")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn compose_config_is_valid_with_the_compose_environment() {
    let env = compose_env();
    let out = check(&repo("deploy/sluice/compose.toml"), &env).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("quotas kept in Redis"), "{out}");
    covers(&env, "deploy/sluice/compose.toml");
}

/// `sluice check` does not need the keys themselves (a CI machine has no
/// secrets); `sluice serve` refuses to start without them. So: every
/// `api_key_env` variable the config names is one the deployment sets.
fn covers(env: &[(String, String)], config: &str) {
    let text = read(config);
    let mut named = Vec::new();
    for line in text.lines() {
        let Some(list) = line.trim().strip_prefix("api_key_env") else {
            continue;
        };
        named.extend(
            list.split('"')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>(),
        );
    }
    assert!(!named.is_empty(), "{config} names no api_key_env");
    for var in named {
        assert!(
            env.iter().any(|(k, v)| *k == var && !v.is_empty()),
            "{config} reads {var}, which the deployment does not set"
        );
    }
}

#[test]
fn kubernetes_config_is_valid_with_the_secret_environment() {
    let env = secret_env();
    let out = check(&repo("deploy/k8s/base/sluice.toml"), &env).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("DNS `vllm-chat:8000`"), "{out}");
    assert!(out.contains("quotas kept in Redis"), "{out}");
    covers(&env, "deploy/k8s/base/sluice.toml");
}

#[test]
fn reference_config_is_valid() {
    check(&repo("fixtures/configs/sluice.toml"), &[]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn experiment_example_is_valid() {
    check(&repo("fixtures/configs/experiment.toml"), &[]).unwrap_or_else(|e| panic!("{e}"));
}
