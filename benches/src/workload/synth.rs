//! The synthetic workload generator: classes, shared-prefix groups, tenants, arrivals.
//!
//! A spec (TOML) describes request classes with length distributions, how
//! each class shares prefixes (system prompts, RAG documents, multi-turn
//! conversations that grow by turns), a tenant mix and an arrival process.
//! The same spec and seed always give the same workload.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};
use sluice_policies::prefix::stable_hash;

use super::arrival::{Arrival, ArrivalClock};
use super::dist::LengthDist;
use super::request::{Content, Message, Segment, WorkloadRequest, read_workload};
use crate::error::{BenchError, Result};

/// Most requests a spec may ask for (keeps memory bounded).
pub const MAX_REQUESTS: usize = 5_000_000;

/// A synthetic workload specification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthSpec {
    /// Seed of every random choice.
    #[serde(default)]
    pub seed: u64,
    /// Number of requests to generate.
    #[serde(default)]
    pub requests: Option<usize>,
    /// Generate arrivals up to this offset instead (seconds).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// The arrival process.
    pub arrival: Arrival,
    /// Tenant mix (one `default` tenant when empty).
    #[serde(default)]
    pub tenants: Vec<TenantSpec>,
    /// Request classes.
    pub classes: Vec<ClassSpec>,
}

/// One tenant and its share of requests (or conversations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Tenant name.
    pub name: String,
    /// Relative weight.
    #[serde(default = "unit")]
    pub weight: f64,
}

/// Which endpoint a class's requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `/v1/chat/completions`.
    #[default]
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// One class of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    /// Class name (recorded on each request).
    pub name: String,
    /// Relative weight among classes.
    #[serde(default = "unit")]
    pub weight: f64,
    /// Chat or completions API.
    #[serde(default)]
    pub api: Api,
    /// Stream responses.
    #[serde(default = "yes")]
    pub stream: bool,
    /// Ask for exactly `max_tokens` output tokens.
    #[serde(default = "yes")]
    pub ignore_eos: bool,
    /// Tokens of the request's own (unshared) prompt text.
    pub prompt: LengthDist,
    /// Requested output tokens (`max_tokens`).
    pub output: LengthDist,
    /// How requests of this class share prefixes.
    #[serde(default)]
    pub prefix: PrefixSpec,
}

/// How a class's requests share prompt prefixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PrefixSpec {
    /// No shared prefix.
    #[default]
    None,
    /// One of `groups` system prompts, chosen with Zipf skew `zipf` (0 = uniform).
    SystemPrompt {
        /// Number of distinct system prompts.
        groups: u32,
        /// Length of each system prompt.
        tokens: LengthDist,
        /// Zipf exponent of popularity.
        #[serde(default)]
        zipf: f64,
    },
    /// One of `documents` documents placed before the question, Zipf-popular.
    Rag {
        /// Number of distinct documents.
        documents: u32,
        /// Length of each document.
        tokens: LengthDist,
        /// Zipf exponent of popularity.
        #[serde(default = "unit")]
        zipf: f64,
    },
    /// Multi-turn conversations: `active` at once, each of a sampled number of
    /// turns; every turn resends the whole history plus a new user message.
    Conversation {
        /// Conversations in progress at any time.
        active: u32,
        /// Turns per conversation.
        turns: LengthDist,
        /// Distinct system prompts conversations start with (0 = none).
        #[serde(default)]
        system_prompts: u32,
        /// Length of those system prompts.
        #[serde(default = "default_system_tokens")]
        system_tokens: LengthDist,
    },
}

fn unit() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

fn default_system_tokens() -> LengthDist {
    LengthDist::Fixed { value: 512 }
}

fn invalid(message: impl Into<String>) -> BenchError {
    BenchError::invalid("workload spec", message)
}

impl SynthSpec {
    /// Parses a TOML spec.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let spec: SynthSpec = toml::from_str(text).map_err(|e| BenchError::Parse {
            path: origin.to_path_buf(),
            line: None,
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Reads and parses a TOML spec file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        Self::from_toml(&text, path)
    }

    /// Checks every parameter.
    pub fn validate(&self) -> Result<()> {
        match (self.requests, self.duration_s) {
            (Some(0), _) => return Err(invalid("requests must be at least 1")),
            (Some(n), _) if n > MAX_REQUESTS => {
                return Err(invalid(format!("requests {n} > {MAX_REQUESTS}")));
            }
            (None, None) => return Err(invalid("set `requests` or `duration_s`")),
            (None, Some(d)) if !(d.is_finite() && d > 0.0) => {
                return Err(invalid("duration_s must be > 0"));
            }
            _ => {}
        }
        self.arrival
            .validate()
            .map_err(|m| invalid(format!("arrival: {m}")))?;
        if self.classes.is_empty() {
            return Err(invalid("no classes"));
        }
        weights_ok(self.tenants.iter().map(|t| t.weight), "tenant")?;
        weights_ok(self.classes.iter().map(|c| c.weight), "class")?;
        for c in &self.classes {
            let ctx = |m: String| invalid(format!("class {}: {m}", c.name));
            c.prompt
                .validate()
                .map_err(|m| ctx(format!("prompt: {m}")))?;
            c.output
                .validate()
                .map_err(|m| ctx(format!("output: {m}")))?;
            match &c.prefix {
                PrefixSpec::None => {}
                PrefixSpec::SystemPrompt {
                    groups,
                    tokens,
                    zipf,
                }
                | PrefixSpec::Rag {
                    documents: groups,
                    tokens,
                    zipf,
                } => {
                    if *groups == 0 {
                        return Err(ctx("prefix groups must be at least 1".into()));
                    }
                    if !(zipf.is_finite() && *zipf >= 0.0) {
                        return Err(ctx("zipf must be >= 0".into()));
                    }
                    tokens
                        .validate()
                        .map_err(|m| ctx(format!("prefix tokens: {m}")))?;
                }
                PrefixSpec::Conversation {
                    active,
                    turns,
                    system_tokens,
                    ..
                } => {
                    if *active == 0 {
                        return Err(ctx("active conversations must be at least 1".into()));
                    }
                    turns.validate().map_err(|m| ctx(format!("turns: {m}")))?;
                    system_tokens
                        .validate()
                        .map_err(|m| ctx(format!("system_tokens: {m}")))?;
                }
            }
        }
        Ok(())
    }
}

fn weights_ok(ws: impl Iterator<Item = f64>, what: &str) -> Result<()> {
    let mut sum = 0.0;
    for w in ws {
        if !(w.is_finite() && w >= 0.0) {
            return Err(invalid(format!("{what} weight {w} must be >= 0")));
        }
        sum += w;
    }
    if sum.is_nan() || sum == 0.0 && what == "class" {
        return Err(invalid(format!("{what} weights sum to 0")));
    }
    Ok(())
}

/// Index drawn by weight.
fn pick_weighted<R: Rng + ?Sized>(rng: &mut R, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len().saturating_sub(1)
}

/// Group index in `0..n`, uniform when `zipf` is 0, else Zipf-skewed towards 0.
fn pick_group<R: Rng + ?Sized>(rng: &mut R, n: u32, zipf: f64) -> u32 {
    if zipf > 0.0 && n > 1 {
        if let Ok(z) = Zipf::new(f64::from(n), zipf) {
            return (z.sample(rng) as u32).clamp(1, n) - 1;
        }
    }
    rng.random_range(0..n)
}

/// A seed derived from the spec seed and a name, independent of generation order.
fn derived_seed(seed: u64, name: &str) -> u64 {
    stable_hash(&format!("{seed}/{name}"))
}

/// A group's prefix segment: its length is drawn from its own seed so it does not depend on order.
fn group_segment(seed: u64, key: &str, tokens: &LengthDist) -> Segment {
    let s = derived_seed(seed, key);
    let mut rng = StdRng::seed_from_u64(s);
    Segment {
        seed: s,
        tokens: tokens.sample(&mut rng),
    }
}

struct Conversation {
    id: u64,
    tenant: String,
    messages: Vec<Message>,
    turns_left: u32,
}

struct Generator<'a> {
    spec: &'a SynthSpec,
    rng: StdRng,
    tenant_weights: Vec<f64>,
    conversations: Vec<Vec<Option<Conversation>>>,
    next_conversation: u64,
}

impl Generator<'_> {
    fn tenant(&mut self) -> String {
        if self.spec.tenants.is_empty() {
            return "default".into();
        }
        let i = pick_weighted(&mut self.rng, &self.tenant_weights);
        self.spec.tenants[i].name.clone()
    }

    fn unique_segment(&mut self, index: usize, part: &str, tokens: u32) -> Segment {
        Segment {
            seed: derived_seed(self.spec.seed, &format!("{part}/{index}")),
            tokens,
        }
    }

    fn request(&mut self, index: usize, arrival_ms: f64) -> WorkloadRequest {
        let spec = self.spec;
        let weights: Vec<f64> = spec.classes.iter().map(|c| c.weight).collect();
        let ci = pick_weighted(&mut self.rng, &weights);
        let class = &spec.classes[ci];
        let own = class.prompt.sample(&mut self.rng);
        let max_tokens = class.output.sample(&mut self.rng).max(1);
        let own_seg = self.unique_segment(index, "user", own);
        let user = Message {
            role: "user".into(),
            content: Content::Segments(vec![own_seg]),
        };
        let (tenant, group, messages) = match &class.prefix {
            PrefixSpec::None => (self.tenant(), None, vec![user]),
            PrefixSpec::SystemPrompt {
                groups,
                tokens,
                zipf,
            } => {
                let g = pick_group(&mut self.rng, *groups, *zipf);
                let seg = group_segment(spec.seed, &format!("{}/sys/{g}", class.name), tokens);
                let system = Message {
                    role: "system".into(),
                    content: Content::Segments(vec![seg]),
                };
                (
                    self.tenant(),
                    Some(format!("{}-sys-{g}", class.name)),
                    vec![system, user],
                )
            }
            PrefixSpec::Rag {
                documents,
                tokens,
                zipf,
            } => {
                let d = pick_group(&mut self.rng, *documents, *zipf);
                let doc = group_segment(spec.seed, &format!("{}/doc/{d}", class.name), tokens);
                let msg = Message {
                    role: "user".into(),
                    content: Content::Segments(vec![doc, own_seg]),
                };
                (
                    self.tenant(),
                    Some(format!("{}-doc-{d}", class.name)),
                    vec![msg],
                )
            }
            PrefixSpec::Conversation {
                active,
                turns,
                system_prompts,
                system_tokens,
            } => {
                let slot = self.rng.random_range(0..*active) as usize;
                self.conversations[ci].resize_with(*active as usize, || None);
                let mut conv = match self.conversations[ci][slot].take() {
                    Some(c) => c,
                    None => {
                        let id = self.next_conversation;
                        self.next_conversation += 1;
                        let tenant = self.tenant();
                        let turns_left = turns.sample(&mut self.rng).max(1);
                        let mut messages = Vec::new();
                        if *system_prompts > 0 {
                            let g = self.rng.random_range(0..*system_prompts);
                            let seg = group_segment(
                                spec.seed,
                                &format!("{}/sys/{g}", class.name),
                                system_tokens,
                            );
                            messages.push(Message {
                                role: "system".into(),
                                content: Content::Segments(vec![seg]),
                            });
                        }
                        Conversation {
                            id,
                            tenant,
                            messages,
                            turns_left,
                        }
                    }
                };
                let reply = self.unique_segment(index, "assistant", max_tokens);
                conv.messages.push(user);
                let messages = conv.messages.clone();
                // The next turn carries this turn's answer (as text of the requested length).
                conv.messages.push(Message {
                    role: "assistant".into(),
                    content: Content::Segments(vec![reply]),
                });
                conv.turns_left -= 1;
                let out = (
                    conv.tenant.clone(),
                    Some(format!("{}-conv-{}", class.name, conv.id)),
                    messages,
                );
                if conv.turns_left > 0 {
                    self.conversations[ci][slot] = Some(conv);
                }
                out
            }
        };
        let (messages, prompt) = match class.api {
            Api::Chat => (Some(messages), None),
            Api::Completions => {
                let segs: Vec<Segment> = messages
                    .into_iter()
                    .flat_map(|m| match m.content {
                        Content::Segments(s) => s,
                        Content::Text(_) => Vec::new(),
                    })
                    .collect();
                (None, Some(Content::Segments(segs)))
            }
        };
        WorkloadRequest {
            id: format!("{}-{index}", class.name),
            arrival_ms: (arrival_ms * 1000.0).round() / 1000.0,
            tenant,
            class: Some(class.name.clone()),
            prefix_group: group,
            messages,
            prompt,
            max_tokens,
            stream: class.stream,
            ignore_eos: class.ignore_eos,
        }
    }
}

/// Generates the workload a spec describes.
pub fn generate(spec: &SynthSpec) -> Result<Vec<WorkloadRequest>> {
    spec.validate()?;
    let replay = match &spec.arrival {
        Arrival::Replay { path, .. } => {
            Some(read_workload(path)?.iter().map(|r| r.arrival_ms).collect())
        }
        _ => None,
    };
    let mut clock =
        ArrivalClock::new(&spec.arrival, replay).map_err(|m| invalid(format!("arrival: {m}")))?;
    let mut arrival_rng = StdRng::seed_from_u64(derived_seed(spec.seed, "arrivals"));
    let mut g = Generator {
        spec,
        rng: StdRng::seed_from_u64(spec.seed),
        tenant_weights: spec.tenants.iter().map(|t| t.weight).collect(),
        conversations: spec.classes.iter().map(|_| Vec::new()).collect(),
        next_conversation: 0,
    };
    let limit = spec.requests.unwrap_or(MAX_REQUESTS);
    let mut out = Vec::new();
    for i in 0..limit {
        let t = clock.next_ms(&mut arrival_rng);
        if spec.duration_s.is_some_and(|d| t > d * 1000.0) {
            break;
        }
        out.push(g.request(i, t));
    }
    if out.is_empty() {
        return Err(invalid("the spec generates no request within duration_s"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policies::prefix::block_hashes;
    use sluice_policies::tokens::estimate_token_ids;
    use std::collections::HashMap;

    const SPEC: &str = r#"
seed = 7
requests = 2000
arrival = { kind = "poisson", rate = 50 }
tenants = [{ name = "a", weight = 3 }, { name = "b", weight = 1 }]

[[classes]]
name = "chat"
weight = 2
prompt = { kind = "uniform", min = 20, max = 60 }
output = { kind = "fixed", value = 32 }
prefix = { kind = "conversation", active = 16, turns = { kind = "uniform", min = 2, max = 6 }, system_prompts = 2, system_tokens = { kind = "fixed", value = 256 } }

[[classes]]
name = "rag"
weight = 1
api = "completions"
stream = false
prompt = { kind = "fixed", value = 30 }
output = { kind = "lognormal", median = 100, sigma = 0.3 }
prefix = { kind = "rag", documents = 10, tokens = { kind = "fixed", value = 1000 }, zipf = 1.2 }

[[classes]]
name = "sys"
weight = 1
prompt = { kind = "fixed", value = 10 }
output = { kind = "fixed", value = 8 }
prefix = { kind = "system_prompt", groups = 3, tokens = { kind = "fixed", value = 300 } }
"#;

    fn spec() -> SynthSpec {
        SynthSpec::from_toml(SPEC, Path::new("spec.toml")).unwrap()
    }

    #[test]
    fn same_seed_same_workload_other_seed_differs() {
        let a = generate(&spec()).unwrap();
        assert_eq!(a, generate(&spec()).unwrap());
        let mut s2 = spec();
        s2.seed = 8;
        assert_ne!(a, generate(&s2).unwrap());
        assert_eq!(a.len(), 2000);
        assert!(a.windows(2).all(|w| w[0].arrival_ms <= w[1].arrival_ms));
    }

    #[test]
    fn class_and_tenant_mix_follow_weights() {
        let w = generate(&spec()).unwrap();
        let n = w.len() as f64;
        let count =
            |f: &dyn Fn(&WorkloadRequest) -> bool| w.iter().filter(|r| f(r)).count() as f64 / n;
        let chat = count(&|r| r.class.as_deref() == Some("chat"));
        assert!((chat - 0.5).abs() < 0.04, "{chat}");
        // Tenants are drawn per conversation for chat, per request otherwise: still about 3:1.
        let a = count(&|r| r.tenant == "a");
        assert!((a - 0.75).abs() < 0.06, "{a}");
    }

    #[test]
    fn conversations_grow_by_turns_and_share_token_prefixes() {
        let w = generate(&spec()).unwrap();
        let mut by_conv: HashMap<&str, Vec<&WorkloadRequest>> = HashMap::new();
        for r in &w {
            if let Some(g) = r
                .prefix_group
                .as_deref()
                .filter(|g| g.starts_with("chat-conv"))
            {
                by_conv.entry(g).or_default().push(r);
            }
        }
        let multi = by_conv.values().filter(|v| v.len() >= 2).count();
        assert!(multi > 20, "{multi}");
        for turns in by_conv.values() {
            for pair in turns.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                assert_eq!(
                    b.messages.as_ref().unwrap().len(),
                    a.messages.as_ref().unwrap().len() + 2
                );
                let (ta, tb) = (
                    estimate_token_ids(&a.rendered_prompt()),
                    estimate_token_ids(&b.rendered_prompt()),
                );
                // Everything but the trailing assistant header is a prefix of the next turn.
                let shared = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
                assert!(shared + 8 >= ta.len(), "{shared} of {}", ta.len());
                let ha = block_hashes(&ta, 16, None);
                let hb = block_hashes(&tb, 16, None);
                assert!(ha.len() >= 2 && hb.starts_with(&ha[..ha.len() - 1]));
            }
        }
    }

    #[test]
    fn rag_documents_are_zipf_popular_and_shared() {
        let w = generate(&spec()).unwrap();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for r in w.iter().filter(|r| r.class.as_deref() == Some("rag")) {
            assert!(r.prompt.is_some() && !r.stream);
            *counts
                .entry(r.prefix_group.as_deref().unwrap())
                .or_default() += 1;
        }
        let top = counts.get("rag-doc-0").copied().unwrap_or(0);
        let last = counts.get("rag-doc-9").copied().unwrap_or(0);
        assert!(top > 4 * last.max(1), "{top} vs {last}");
        let docs: Vec<&WorkloadRequest> = w
            .iter()
            .filter(|r| r.prefix_group.as_deref() == Some("rag-doc-0"))
            .take(2)
            .collect();
        let (a, b) = (
            estimate_token_ids(&docs[0].rendered_prompt()),
            estimate_token_ids(&docs[1].rendered_prompt()),
        );
        assert_eq!(a[..1000], b[..1000]);
    }

    #[test]
    fn duration_bounds_the_workload() {
        let mut s = spec();
        s.requests = None;
        s.duration_s = Some(4.0);
        let w = generate(&s).unwrap();
        assert!(w.iter().all(|r| r.arrival_ms <= 4000.0));
        // Poisson(50/s) over 4 s: 200 ± 3 sd (42).
        assert!((158..=242).contains(&w.len()), "{}", w.len());
    }

    #[test]
    fn bad_specs_are_rejected_with_reasons() {
        let bad = SPEC.replace("requests = 2000", "");
        assert!(
            SynthSpec::from_toml(&bad, Path::new("x"))
                .unwrap_err()
                .to_string()
                .contains("duration_s")
        );
        let bad = SPEC.replace("active = 16", "active = 0");
        assert!(
            SynthSpec::from_toml(&bad, Path::new("x"))
                .unwrap_err()
                .to_string()
                .contains("active")
        );
        let bad = SPEC.replace("seed = 7", "seed = 7\nbogus = 1");
        assert!(SynthSpec::from_toml(&bad, Path::new("x")).is_err());
    }
}
