//! A/B experiments: the same workload against each arm (a routing policy and
//! proxy config) on a fresh fleet, arms interleaved over repetitions, with the
//! engine-side view scraped from every replica during each run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{BenchError, Result};
use crate::fleet::{ChildProcess, ProxySpec, SimSpec, start_proxy, start_sims};
use crate::loadgen::output::write_results;
use crate::loadgen::{ApiClient, LoadConfig, LoadMode, run_load};
use crate::metrics::{Slo, Summary, summarize};
use crate::scrape::{EngineSample, scrape_until};
use crate::workload::synth::{SynthSpec, generate};
use crate::workload::{WorkloadRequest, read_workload, write_workload};

/// An experiment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name shown in reports.
    #[serde(default = "default_name")]
    pub name: String,
    /// Runs per arm (per rate in a sweep).
    #[serde(default = "one")]
    pub repetitions: usize,
    /// Seed for replicas and drawn arrivals.
    #[serde(default)]
    pub seed: u64,
    /// How often replicas' `/metrics` are scraped.
    #[serde(default = "default_scrape_ms")]
    pub scrape_interval_ms: u64,
    /// The replicas.
    pub fleet: FleetSpec,
    /// The workload every arm receives.
    pub workload: WorkloadSource,
    /// Pacing.
    #[serde(default)]
    pub load: LoadSpec,
    /// The arms.
    pub arms: Vec<Arm>,
}

/// The replicas behind each arm's proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    /// Number of simulated replicas (a fresh set per run).
    #[serde(default)]
    pub replicas: usize,
    /// Their parameters.
    #[serde(default)]
    pub sim: SimSpec,
    /// Existing endpoints instead of simulated replicas (shared by every run; caches are not reset).
    #[serde(default)]
    pub urls: Vec<String>,
}

/// Where the workload comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSource {
    /// A JSONL workload file (relative paths are relative to the experiment file).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A synthetic spec file to generate it from.
    #[serde(default)]
    pub spec: Option<PathBuf>,
    /// An inline synthetic spec.
    #[serde(default)]
    pub inline: Option<SynthSpec>,
}

/// How the workload is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// Open loop at this rate instead of the workload's arrival times.
    #[serde(default)]
    pub rate: Option<f64>,
    /// A sweep: one run per rate per arm (overrides `rate`).
    #[serde(default)]
    pub rates: Vec<f64>,
    /// Gamma shape for drawn arrivals.
    #[serde(default)]
    pub burstiness: Option<f64>,
    /// Closed loop with this many users instead.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Requests per run.
    #[serde(default)]
    pub requests: Option<usize>,
    /// Seconds per run.
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Factor on workload arrival offsets.
    #[serde(default)]
    pub time_scale: Option<f64>,
    /// Bound on one request, seconds.
    #[serde(default)]
    pub request_timeout_s: Option<f64>,
    /// Goodput SLOs, in engine time (see [`LoadSpec::wall_clock_slo`]).
    #[serde(default)]
    pub slo: Slo,
}

impl LoadSpec {
    /// The SLOs on the wall clock the records are taken on: a replica
    /// simulated `speedup` times faster than real time meets a 500 ms engine
    /// TTFT objective when its first token comes within 500 / speedup ms.
    pub fn wall_clock_slo(&self, exp: &Experiment) -> Slo {
        let f = crate::report::engine_time_factor(exp);
        let scale = |v: Option<f64>| v.map(|ms| ms / f);
        Slo {
            ttft_ms: scale(self.slo.ttft_ms),
            tpot_ms: scale(self.slo.tpot_ms),
            e2el_ms: scale(self.slo.e2el_ms),
        }
    }
}

/// One arm: how its proxy is configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    /// Arm name (labels everything).
    pub name: String,
    /// Routing policy (`sluice serve --policy`).
    #[serde(default)]
    pub policy: Option<String>,
    /// A proxy config template; `{{upstreams}}` becomes a TOML array of the replica URLs
    /// and `{{policy}}` the policy (admission, quotas and the rest as the proxy config says).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// More `sluice serve` flags.
    #[serde(default)]
    pub serve_args: Vec<String>,
}

fn default_name() -> String {
    "experiment".into()
}

fn one() -> usize {
    1
}

fn default_scrape_ms() -> u64 {
    500
}

fn invalid(m: impl Into<String>) -> BenchError {
    BenchError::invalid("experiment", m)
}

impl Experiment {
    /// Reads an experiment file; relative paths in it are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        let mut e: Experiment = toml::from_str(&text).map_err(|err| BenchError::Parse {
            path: path.to_path_buf(),
            line: None,
            message: err.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        e.workload.path.as_mut().map(fix);
        e.workload.spec.as_mut().map(fix);
        for a in &mut e.arms {
            a.config.as_mut().map(fix);
        }
        e.validate()?;
        Ok(e)
    }

    /// Checks the experiment before anything starts.
    pub fn validate(&self) -> Result<()> {
        if self.arms.is_empty() {
            return Err(invalid("no arms"));
        }
        let mut names = std::collections::HashSet::new();
        for a in &self.arms {
            if a.name.is_empty()
                || !a
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(format!(
                    "arm name {:?} must be non-empty [A-Za-z0-9._-]",
                    a.name
                )));
            }
            if !names.insert(&a.name) {
                return Err(invalid(format!("arm {} appears twice", a.name)));
            }
        }
        if self.repetitions == 0 || self.repetitions > 100 {
            return Err(invalid("repetitions must be 1..=100"));
        }
        if self.fleet.urls.is_empty() && !(1..=64).contains(&self.fleet.replicas) {
            return Err(invalid(
                "fleet.replicas must be 1..=64 (or give fleet.urls)",
            ));
        }
        if !(self.fleet.sim.speedup.is_finite() && self.fleet.sim.speedup > 0.0) {
            return Err(invalid("fleet.sim.speedup must be > 0"));
        }
        let sources = [
            self.workload.path.is_some(),
            self.workload.spec.is_some(),
            self.workload.inline.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(invalid("workload needs exactly one of path, spec, inline"));
        }
        if self
            .load
            .rates
            .iter()
            .chain(self.load.rate.iter())
            .any(|r| !(r.is_finite() && *r > 0.0))
        {
            return Err(invalid("rates must be > 0"));
        }
        if self.load.concurrency.is_some()
            && (self.load.rate.is_some() || !self.load.rates.is_empty())
        {
            return Err(invalid(
                "load.concurrency (closed loop) excludes rate/rates",
            ));
        }
        Ok(())
    }

    /// The workload every arm receives.
    pub fn workload(&self) -> Result<Vec<WorkloadRequest>> {
        if let Some(p) = &self.workload.path {
            return read_workload(p);
        }
        let spec = match (&self.workload.spec, &self.workload.inline) {
            (Some(p), _) => SynthSpec::load(p)?,
            (None, Some(s)) => s.clone(),
            (None, None) => return Err(invalid("no workload source")),
        };
        generate(&spec)
    }

    fn load_config(&self, rate: Option<f64>) -> Result<LoadConfig> {
        let secs = |v: f64, what: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(invalid(format!("{what} must be > 0")))
            }
        };
        Ok(LoadConfig {
            mode: match self.load.concurrency {
                Some(concurrency) => LoadMode::Closed { concurrency },
                None => LoadMode::Open {
                    rate,
                    burstiness: self.load.burstiness.unwrap_or(1.0),
                    max_concurrency: None,
                },
            },
            requests: self.load.requests,
            duration: self
                .load
                .duration_s
                .map(|d| secs(d, "load.duration_s"))
                .transpose()?,
            time_scale: self.load.time_scale.unwrap_or(1.0),
            seed: self.seed,
            request_timeout: secs(
                self.load.request_timeout_s.unwrap_or(300.0),
                "load.request_timeout_s",
            )?,
            progress: false,
        })
    }
}

/// One replica's share of a run (deltas of its counters over the run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ReplicaResult {
    /// The replica's URL.
    pub url: String,
    /// Requests it finished.
    pub requests: f64,
    /// Prompt tokens served from its prefix cache.
    pub prefix_hits: f64,
    /// Prompt tokens looked up in its prefix cache.
    pub prefix_queries: f64,
    /// Preemptions.
    pub preemptions: f64,
    /// Peak KV usage seen (0..=1).
    pub peak_kv_usage: f64,
    /// Peak waiting requests seen.
    pub peak_waiting: f64,
}

/// One run of one arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Arm name.
    pub arm: String,
    /// Repetition index.
    pub rep: usize,
    /// Offered rate (sweeps), requests/s.
    pub rate: Option<f64>,
    /// Where the run's files are.
    pub dir: PathBuf,
    /// Client-side metrics.
    pub summary: Summary,
    /// Requests the proxy turned away for load: 429 or 503 (admission sheds, quotas).
    #[serde(default)]
    pub shed: usize,
    /// Engine-side view per replica.
    pub replicas: Vec<ReplicaResult>,
    /// Prefix cache hit rate over all replicas (hit tokens / queried tokens).
    pub prefix_hit_rate: Option<f64>,
    /// Preemptions over all replicas.
    pub preemptions: f64,
    /// Requests of the busiest replica over the mean.
    pub max_over_mean_requests: Option<f64>,
    /// Lines in the proxy's lifecycle log.
    pub lifecycle_records: Option<usize>,
    /// Scraped time series per replica.
    pub series: Vec<Vec<EngineSample>>,
}

/// Everything an experiment produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExperimentResult {
    /// The experiment as run.
    pub experiment: Experiment,
    /// Every run, in execution order.
    pub runs: Vec<RunResult>,
    /// Stopped early by Ctrl-C.
    pub interrupted: bool,
}

/// Per-replica deltas of a scraped series.
fn replica_results(urls: &[String], series: &[Vec<EngineSample>]) -> Vec<ReplicaResult> {
    urls.iter()
        .zip(series)
        .map(|(url, s)| {
            let (Some(first), Some(last)) = (s.first(), s.last()) else {
                return ReplicaResult {
                    url: url.clone(),
                    ..Default::default()
                };
            };
            ReplicaResult {
                url: url.clone(),
                requests: last.requests - first.requests,
                prefix_hits: last.prefix_hits - first.prefix_hits,
                prefix_queries: last.prefix_queries - first.prefix_queries,
                preemptions: last.preemptions - first.preemptions,
                peak_kv_usage: s.iter().map(|x| x.kv_usage).fold(0.0, f64::max),
                peak_waiting: s.iter().map(|x| x.waiting).fold(0.0, f64::max),
            }
        })
        .collect()
}

/// Renders an arm's config template for `upstreams`.
fn render_config(
    template: &Path,
    upstreams: &[String],
    policy: Option<&str>,
    out: &Path,
) -> Result<PathBuf> {
    let text = std::fs::read_to_string(template).map_err(|e| BenchError::io(template, e))?;
    let list = format!(
        "[{}]",
        upstreams
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let text = text
        .replace("{{upstreams}}", &list)
        .replace("{{policy}}", policy.unwrap_or("round_robin"));
    std::fs::write(out, text).map_err(|e| BenchError::io(out, e))?;
    Ok(out.to_path_buf())
}

/// Waits until the proxy's admin `/readyz` answers 200 (a proxy without one is taken as ready).
async fn wait_ready(proxy: &ChildProcess) -> Result<()> {
    let Some(admin) = &proxy.admin_url else {
        return Ok(());
    };
    let client = ApiClient::connect(admin, Some(String::new()), None).await?;
    for _ in 0..100 {
        match client.get("/readyz").await {
            Ok((200, _)) | Ok((404, _)) => return Ok(()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err(BenchError::Child {
        name: proxy.name.clone(),
        message: "not ready after 10 s (/readyz)".into(),
    })
}

/// Waits (at most 10 s, returning as soon as they agree) until the replicas have
/// counted `done` finished requests in total: an engine may count a request just
/// after its last byte went out, and a loaded machine can delay that by seconds.
async fn settle(urls: &[String], done: usize) {
    let mut clients = Vec::new();
    for u in urls {
        if let Ok(c) = ApiClient::connect(u, Some(String::new()), None).await {
            clients.push(c);
        }
    }
    for _ in 0..100 {
        let mut total = 0.0;
        for c in &clients {
            if let Ok((200, body)) = c.get("/metrics").await {
                total += crate::scrape::parse_sample(&String::from_utf8_lossy(&body), 0.0).requests;
            }
        }
        if total >= done as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one arm once: fresh fleet, proxy, load, scrape; everything is stopped before returning.
/// What every run of an experiment shares.
struct RunContext<'a> {
    exp: &'a Experiment,
    exe: &'a Path,
    workload: &'a [WorkloadRequest],
    stop: watch::Receiver<bool>,
}

async fn run_arm(
    ctx: &RunContext<'_>,
    arm: &Arm,
    rep: usize,
    rate: Option<f64>,
    dir: &Path,
) -> Result<RunResult> {
    let (exp, exe, workload) = (ctx.exp, ctx.exe, ctx.workload);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| BenchError::io(&logs, e))?;
    let sims = if exp.fleet.urls.is_empty() {
        start_sims(exe, &exp.fleet.sim, exp.fleet.replicas, exp.seed, &logs).await?
    } else {
        Vec::new()
    };
    let urls: Vec<String> = if sims.is_empty() {
        exp.fleet.urls.clone()
    } else {
        sims.iter().map(|s| s.url.clone()).collect()
    };
    let config = match &arm.config {
        Some(t) => Some(render_config(
            t,
            &urls,
            arm.policy.as_deref(),
            &dir.join("proxy.toml"),
        )?),
        None => None,
    };
    let lifecycle = dir.join("lifecycle.jsonl");
    let spec = ProxySpec {
        name: "proxy",
        upstreams: &urls,
        policy: arm.policy.as_deref(),
        config: config.as_deref(),
        lifecycle: &lifecycle,
        arm: &arm.name,
        model: (!sims.is_empty()).then_some(exp.fleet.sim.model.as_str()),
        extra_args: &arm.serve_args,
    };
    let mut proxy = start_proxy(exe, &spec, &logs).await?;
    wait_ready(&proxy).await?;
    let model = (!sims.is_empty()).then(|| exp.fleet.sim.model.clone());
    let client = ApiClient::connect(&proxy.url, model, None).await?;
    let (scrape_stop_tx, scrape_stop) = watch::channel(false);
    let (baseline_tx, baseline) = tokio::sync::oneshot::channel();
    let scraper = tokio::spawn(scrape_until(
        urls.clone(),
        Duration::from_millis(exp.scrape_interval_ms),
        scrape_stop,
        baseline_tx,
    ));
    // Per-replica counts are deltas from the first scrape: take it before any load.
    let _ = baseline.await;
    let cfg = exp.load_config(rate)?;
    let out = run_load(client, workload.to_vec(), &cfg, ctx.stop.clone()).await;
    if let Ok(o) = &out {
        settle(&urls, o.records.iter().filter(|r| r.success).count()).await;
    }
    let _ = scrape_stop_tx.send(true);
    let series = scraper.await.unwrap_or_default();
    let alive = proxy.check_alive();
    proxy.stop().await;
    for s in sims {
        s.stop().await;
    }
    let out = out?;
    alive?;
    let summary = summarize(&out.records, out.duration_s, &exp.load.wall_clock_slo(exp));
    let meta = serde_json::json!({"arm": arm, "rep": rep, "rate": rate, "upstreams": urls, "interrupted": out.interrupted});
    write_results(dir, &out.records, &summary, &meta)?;
    let replicas = replica_results(&urls, &series);
    std::fs::write(
        dir.join("engine.json"),
        serde_json::to_vec_pretty(&serde_json::json!({"replicas": replicas, "series": series}))?,
    )
    .map_err(|e| BenchError::io(dir.join("engine.json"), e))?;
    let hits: f64 = replicas.iter().map(|r| r.prefix_hits).sum();
    let queries: f64 = replicas.iter().map(|r| r.prefix_queries).sum();
    let counts: Vec<f64> = replicas.iter().map(|r| r.requests).collect();
    let mean = counts.iter().sum::<f64>() / counts.len().max(1) as f64;
    let lifecycle_records = std::fs::read_to_string(&lifecycle)
        .ok()
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count());
    Ok(RunResult {
        arm: arm.name.clone(),
        rep,
        rate,
        dir: dir.to_path_buf(),
        summary,
        shed: out
            .records
            .iter()
            .filter(|r| matches!(r.status, 429 | 503))
            .count(),
        prefix_hit_rate: (queries > 0.0).then(|| hits / queries),
        preemptions: replicas.iter().map(|r| r.preemptions).sum(),
        max_over_mean_requests: (mean > 0.0)
            .then(|| counts.iter().fold(0.0f64, |a, b| a.max(*b)) / mean),
        replicas,
        lifecycle_records,
        series,
    })
}

/// Runs every arm `repetitions` times (per rate in a sweep), in interleaved
/// order: repetition `r` starts with arm `r mod arms`. Results go under `out`.
pub async fn run_experiment(
    exp: &Experiment,
    exe: &Path,
    out: &Path,
    stop: watch::Receiver<bool>,
    mut on_run: impl FnMut(&RunResult),
) -> Result<ExperimentResult> {
    exp.validate()?;
    let workload = exp.workload()?;
    std::fs::create_dir_all(out).map_err(|e| BenchError::io(out, e))?;
    write_workload(&out.join("workload.jsonl"), &workload)?;
    let rates: Vec<Option<f64>> = if exp.load.rates.is_empty() {
        vec![exp.load.rate]
    } else {
        exp.load.rates.iter().map(|r| Some(*r)).collect()
    };
    let mut runs = Vec::new();
    let n = exp.arms.len();
    let ctx = RunContext {
        exp,
        exe,
        workload: &workload,
        stop: stop.clone(),
    };
    'outer: for rep in 0..exp.repetitions {
        for rate in &rates {
            for k in 0..n {
                if *stop.borrow() {
                    break 'outer;
                }
                let arm = &exp.arms[(rep + k) % n];
                let mut dir = out.join("runs").join(&arm.name).join(format!("rep{rep}"));
                if let Some(r) = rate {
                    dir = dir.join(format!("rate{r}"));
                }
                let result = run_arm(&ctx, arm, rep, *rate, &dir).await?;
                on_run(&result);
                runs.push(result);
            }
        }
    }
    let result = ExperimentResult {
        experiment: exp.clone(),
        runs,
        interrupted: *stop.borrow(),
    };
    std::fs::write(
        out.join("experiment.json"),
        serde_json::to_vec_pretty(&result)?,
    )
    .map_err(|e| BenchError::io(out.join("experiment.json"), e))?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXP: &str = r#"
name = "t"
repetitions = 2
[fleet]
replicas = 2
sim = { speedup = 50, num_gpu_blocks = 512 }
[workload]
inline = { seed = 1, requests = 10, arrival = { kind = "poisson", rate = 100 }, classes = [{ name = "c", prompt = { kind = "fixed", value = 10 }, output = { kind = "fixed", value = 4 } }] }
[load]
slo = { ttft_ms = 500 }
[[arms]]
name = "rr"
policy = "round_robin"
[[arms]]
name = "ca"
policy = "cache_aware"
"#;

    #[test]
    fn parses_and_validates() {
        let e: Experiment = toml::from_str(EXP).unwrap();
        e.validate().unwrap();
        assert_eq!(e.workload().unwrap().len(), 10);
        assert_eq!(e.fleet.sim.speedup, 50.0);
        let mut bad = e.clone();
        bad.arms[1].name = "rr".into();
        assert!(bad.validate().unwrap_err().to_string().contains("twice"));
        let mut bad = e.clone();
        bad.fleet.replicas = 0;
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<Experiment>(&EXP.replace("name = \"t\"", "nme = 1")).is_err());
    }

    #[test]
    fn shipped_experiments_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let e = Experiment::load(&dir.join("mooncake.toml")).unwrap();
        assert_eq!((e.fleet.replicas, e.fleet.sim.speedup), (4, 4.0));
        // The trace is replayed at its own rate in engine time.
        assert_eq!(e.load.time_scale, Some(1.0 / e.fleet.sim.speedup));
        assert_eq!(e.workload.path, Some(dir.join("mooncake.jsonl")));
        // Admission under 3× overload: both arms' proxy configs exist; unloaded and 3× capacity.
        let e = Experiment::load(&dir.join("admission_overload.toml")).unwrap();
        assert_eq!(e.load.rates, vec![5.0, 60.0]);
        for arm in &e.arms {
            let config = arm.config.as_ref().unwrap();
            let text = std::fs::read_to_string(config).unwrap();
            assert!(text.contains("{{upstreams}}"), "{}", config.display());
            assert_eq!(text.contains("[pools.admission]"), arm.name == "admission");
        }
    }

    #[test]
    fn replica_deltas_and_config_templates() {
        let s = |t: f64, req: f64, hits: f64| EngineSample {
            t_s: t,
            requests: req,
            prefix_hits: hits,
            prefix_queries: hits * 2.0,
            kv_usage: t / 10.0,
            ..Default::default()
        };
        let r = replica_results(
            &["u".into()],
            &[vec![
                s(0.0, 5.0, 10.0),
                s(1.0, 9.0, 30.0),
                s(2.0, 15.0, 50.0),
            ]],
        );
        assert_eq!(
            (
                r[0].requests,
                r[0].prefix_hits,
                r[0].prefix_queries,
                r[0].peak_kv_usage
            ),
            (10.0, 40.0, 80.0, 0.2)
        );
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.toml");
        std::fs::write(&t, "upstreams = {{upstreams}}\npolicy = \"{{policy}}\"\n").unwrap();
        let out = render_config(
            &t,
            &["http://a".into(), "http://b".into()],
            Some("cache_aware"),
            &dir.path().join("o.toml"),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(out).unwrap(),
            "upstreams = [\"http://a\", \"http://b\"]\npolicy = \"cache_aware\"\n"
        );
    }
}
