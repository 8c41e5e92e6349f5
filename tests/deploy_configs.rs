//! The configs shipped in `deploy/` must stay valid as the config format evolves:
//! each goes through `sluice check`, the same validation `sluice serve` does.

use std::process::Command;

fn check(path: &std::path::Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run sluice check");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn compose_config_is_valid() {
    check(&repo("deploy/compose-sluice.toml"));
}

#[test]
fn kubernetes_configmap_is_valid() {
    let yaml = std::fs::read_to_string(repo("deploy/k8s/sluice.yaml")).expect("read manifest");
    // The ConfigMap's `sluice.toml: |` block: every line after it indented by four spaces.
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("sluice.toml: |"));
    assert!(lines.next().is_some(), "no sluice.toml in the ConfigMap");
    let toml: String = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("[[pools]]"), "{toml}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, toml).expect("write");
    check(&path);
}

#[test]
fn reference_config_is_valid() {
    check(&repo("fixtures/configs/sluice.toml"));
}

#[test]
fn experiment_example_is_valid() {
    check(&repo("fixtures/configs/experiment.toml"));
}
