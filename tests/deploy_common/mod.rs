//! Shared by the `deploy_*` tests: the repository's `deploy/` files, and a
//! real `sluice serve` started from config text with its own environment
//! (tenant keys come from `api_key_env` variables), stopped on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::sim::{Client, first_stdout_line, wait_until};

/// A path under the repository root.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A file under the repository root, as text.
pub fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `sluice check --config path` with `env` set; the error output on failure.
pub fn check(path: &Path, env: &[(String, String)]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run sluice check");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A running `sluice serve --config FILE`, killed on drop.
pub struct Serve {
    child: Child,
    /// Client of the API listener.
    pub api: Client,
    /// Client of the admin listener.
    pub admin: Client,
    _dir: tempfile::TempDir,
}

impl Serve {
    /// Writes `config` (whose listeners should be on port 0) and starts the
    /// proxy with `env` added to its environment.
    pub fn start(config: &str, env: &[(&str, &str)]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sluice serve");
        let line = first_stdout_line(&mut child, Duration::from_secs(20)).unwrap_or_default();
        let rest = line
            .trim()
            .strip_prefix("sluice-proxy listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let (api, admin) = rest.split_once(" admin http://").expect("line format");
        Serve {
            child,
            api: Client::new(api),
            admin: Client::new(admin),
            _dir: dir,
        }
    }

    /// Sends a signal by name (`TERM`, `HUP`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(20),
            || self.child.try_wait().unwrap().ok_or(()),
            |_| "the proxy did not exit".to_string(),
        )
    }

    /// Waits (bounded) until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        wait_until(
            Duration::from_secs(15),
            Duration::from_millis(20),
            || {
                let r = self.admin.get("/readyz");
                if r.status == 200 {
                    Ok(())
                } else {
                    Err(r.text())
                }
            },
            |last| format!("never ready: {last}"),
        );
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real `sluice` with `args` (a deployment's command line), its
/// `--host`/`--port` replaced by 127.0.0.1 and port 0, and waits for its
/// listening line: the arguments really parse and the replica really starts.
pub fn starts_with_args(args: &[String]) {
    let mut args = args.to_vec();
    for (flag, value) in [("--host", "127.0.0.1"), ("--port", "0")] {
        if let Some(i) = args.iter().position(|a| a == flag) {
            args[i + 1] = value.to_string();
        } else if let Some(i) = args.iter().position(|a| a.starts_with(&format!("{flag}="))) {
            args[i] = format!("{flag}={value}");
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    let line = first_stdout_line(&mut child, Duration::from_secs(20)).unwrap_or_default();
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    assert!(
        line.contains("listening on"),
        "`sluice {}` did not start: {line:?} {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A YAML file (one document) under the repository root, merge keys applied.
pub fn yaml(path: &str) -> serde_yaml::Value {
    let mut v: serde_yaml::Value =
        serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    // A merge can bring in another (`<<: *sim` where `sim` has `<<: *image`):
    // apply until none is left.
    for _ in 0..8 {
        let before = v.clone();
        v.apply_merge().unwrap_or_else(|e| panic!("{path}: {e}"));
        if v == before {
            break;
        }
    }
    v
}

/// The value of `key = "..."` (or `key = N`) on its own line in a TOML text.
pub fn toml_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        if k.trim() != key {
            return None;
        }
        let v = v.split('#').next()?.trim();
        Some(v.trim_matches('"').to_string())
    })
}
