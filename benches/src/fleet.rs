//! Child processes of the running `sluice` executable: simulated replicas
//! (`sluice sim`) and proxies (`sluice serve`). Each is killed when its handle
//! is dropped — on success, on error paths and after Ctrl-C — so no process
//! outlives the run that started it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::error::{BenchError, Result};

/// How long a child may take to print its listening line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The executable to start children from: `SLUICE_BIN` when set (tests of
/// the library), else the running executable.
pub fn sluice_exe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe().map_err(|e| BenchError::io("current executable", e))
}

/// A running child process and the URLs it announced.
#[derive(Debug)]
pub struct ChildProcess {
    /// Role name, e.g. `sim-2` or `proxy-cache_aware`.
    pub name: String,
    /// The API URL it listens on.
    pub url: String,
    /// The admin URL (proxies only).
    pub admin_url: Option<String>,
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `exe args...` with stderr (and stdout after the listening line)
    /// going to `log`, and waits for a stdout line starting with `ready_prefix`.
    pub async fn spawn(
        name: &str,
        exe: &Path,
        args: &[String],
        log: &Path,
        ready_prefix: &str,
    ) -> Result<Self> {
        let child_err = |message: String| BenchError::Child {
            name: name.to_string(),
            message,
        };
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        }
        let log_file = std::fs::File::create(log).map_err(|e| BenchError::io(log, e))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| child_err(format!("cannot start {}: {e}", exe.display())))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(child_err("no stdout pipe".into()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let wait_ready = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.starts_with(ready_prefix) => return Ok(line),
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("exited before it was ready".to_string()),
                    Err(e) => return Err(format!("reading its stdout: {e}")),
                }
            }
        };
        let line = match tokio::time::timeout(READY_TIMEOUT, wait_ready).await {
            Ok(Ok(line)) => line,
            Ok(Err(m)) => return Err(child_err(format!("{m}; {}", log_tail(log)))),
            Err(_) => {
                return Err(child_err(format!(
                    "not ready after {READY_TIMEOUT:?}; {}",
                    log_tail(log)
                )));
            }
        };
        // Keep draining stdout so a chatty child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let urls: Vec<String> = line
            .split_whitespace()
            .filter(|w| w.starts_with("http://"))
            .map(str::to_string)
            .collect();
        let Some(url) = urls.first().cloned() else {
            return Err(child_err(format!("no URL in its listening line {line:?}")));
        };
        Ok(ChildProcess {
            name: name.to_string(),
            url,
            admin_url: urls.get(1).cloned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Fails when the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Child {
                name: self.name.clone(),
                message: format!("exited ({status}); {}", log_tail(&self.log)),
            }),
            Err(e) => Err(BenchError::Child {
                name: self.name.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// Kills the child and waits for it to be reaped.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// The last lines of a child's log, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        format!("log {} is empty", log.display())
    } else {
        format!(
            "log {}: {}",
            log.display(),
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }
}

/// One simulated replica's parameters (`sluice sim` flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSpec {
    /// Model name (fixtures/models).
    #[serde(default = "default_model")]
    pub model: String,
    /// GPU name (fixtures/gpus).
    #[serde(default = "default_gpu")]
    pub gpu: String,
    /// Simulated time runs this many times faster than real time.
    #[serde(default = "default_speedup")]
    pub speedup: f64,
    /// KV cache size in blocks (default: what the model leaves free on the GPU).
    #[serde(default)]
    pub num_gpu_blocks: Option<u64>,
    /// More `sluice sim` flags, passed as given.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

fn default_model() -> String {
    "llama-3.1-8b".into()
}

fn default_gpu() -> String {
    "h100-sxm-80gb".into()
}

fn default_speedup() -> f64 {
    1.0
}

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec {
            model: default_model(),
            gpu: default_gpu(),
            speedup: default_speedup(),
            num_gpu_blocks: None,
            extra_args: Vec::new(),
        }
    }
}

/// Starts `n` simulated replicas (replica `i` gets seed `seed + i`), logs under `log_dir`.
pub async fn start_sims(
    exe: &Path,
    spec: &SimSpec,
    n: usize,
    seed: u64,
    log_dir: &Path,
) -> Result<Vec<ChildProcess>> {
    let mut sims = Vec::with_capacity(n);
    for i in 0..n {
        let mut args: Vec<String> = vec![
            "sim".into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
            "--model".into(),
            spec.model.clone(),
            "--gpu".into(),
            spec.gpu.clone(),
            "--speedup".into(),
            spec.speedup.to_string(),
            "--seed".into(),
            (seed + i as u64).to_string(),
        ];
        if let Some(b) = spec.num_gpu_blocks {
            args.extend(["--num-gpu-blocks".into(), b.to_string()]);
        }
        args.extend(spec.extra_args.iter().cloned());
        let name = format!("sim-{i}");
        // On error the replicas already started are dropped, which kills them.
        sims.push(
            ChildProcess::spawn(
                &name,
                exe,
                &args,
                &log_dir.join(format!("{name}.log")),
                "sluice-sim listening on ",
            )
            .await?,
        );
    }
    Ok(sims)
}

/// How to start one proxy.
#[derive(Debug, Clone)]
pub struct ProxySpec<'a> {
    /// Role name (log file name).
    pub name: &'a str,
    /// Replica URLs (ignored when `config` is given).
    pub upstreams: &'a [String],
    /// Routing policy.
    pub policy: Option<&'a str>,
    /// A proxy config file.
    pub config: Option<&'a Path>,
    /// Where the lifecycle log goes.
    pub lifecycle: &'a Path,
    /// Arm label.
    pub arm: &'a str,
    /// Served model name of the pool.
    pub model: Option<&'a str>,
    /// More `sluice serve` flags.
    pub extra_args: &'a [String],
}

/// Starts a proxy as `spec` says, logging under `log_dir`.
pub async fn start_proxy(exe: &Path, spec: &ProxySpec<'_>, log_dir: &Path) -> Result<ChildProcess> {
    let mut args: Vec<String> = vec!["serve".into()];
    match spec.config {
        Some(c) => args.extend(["--config".into(), c.display().to_string()]),
        None => {
            for u in spec.upstreams {
                args.extend(["--upstream".into(), u.clone()]);
            }
        }
    }
    args.extend([
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
    ]);
    if let (Some(m), None) = (spec.model, spec.config) {
        args.extend(["--model".into(), m.to_string()]);
    }
    if let Some(p) = spec.policy {
        args.extend(["--policy".into(), p.to_string()]);
    }
    args.extend([
        "--lifecycle-log".into(),
        spec.lifecycle.display().to_string(),
        "--arm".into(),
        spec.arm.to_string(),
    ]);
    args.extend(spec.extra_args.iter().cloned());
    ChildProcess::spawn(
        spec.name,
        exe,
        &args,
        &log_dir.join(format!("{}.log", spec.name)),
        "sluice-proxy listening on ",
    )
    .await
}
