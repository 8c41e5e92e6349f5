//! Request classes: sort each request by its shape (prompt length, requested
//! output, optional header) into a configured class, and so into a pool.
//!
//! Rules are tried in configuration order and the first one that matches
//! wins, so the config reads like a routing table: specific classes first,
//! catch-alls last. A rule only matches when its pool can serve the request's
//! model (the caller says which pools can), so one class list can cover
//! several models.

use serde::{Deserialize, Serialize};

use crate::PolicyError;

/// A header condition: the request must carry `name` with exactly `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, matched case-insensitively.
    pub name: String,
    /// Exact header value.
    pub value: String,
}

/// One class rule as written in the `[[classes]]` config table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRule {
    /// Class name (a metric label and a lifecycle field).
    pub name: String,
    /// Pool that serves requests of this class.
    pub pool: String,
    /// Matches prompts of at least this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_prompt_tokens: Option<u32>,
    /// Matches prompts of at most this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompt_tokens: Option<u32>,
    /// Matches requests asking for at least this many output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_output_tokens: Option<u32>,
    /// Matches requests asking for at most this many output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    /// Matches only requests carrying this header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
    /// Output tokens assumed for requests of this class that set no `max_tokens`.
    #[serde(default = "default_output_tokens")]
    pub default_output_tokens: u32,
    /// Time-to-first-token objective of the class, in milliseconds: the
    /// `deadline` admission order serves the earliest arrival + SLO first, and
    /// `shed_on_ttft_slo` sheds what cannot start within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_slo_ms: Option<u64>,
}

/// Output tokens assumed when neither the request nor its class says.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 256;

fn default_output_tokens() -> u32 {
    DEFAULT_OUTPUT_TOKENS
}

/// The facts about a request that classification looks at.
pub struct RequestShape<'a> {
    /// Prompt tokens (counted or estimated).
    pub prompt_tokens: u32,
    /// `max_tokens` / `max_completion_tokens` when the request set one.
    pub max_tokens: Option<u32>,
    /// Header lookup by lowercase name.
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

impl ClassRule {
    /// Whether a request of this shape belongs to this class (pool eligibility aside).
    pub fn matches(&self, shape: &RequestShape<'_>) -> bool {
        let within = |v: u32, lo: Option<u32>, hi: Option<u32>| {
            lo.is_none_or(|lo| v >= lo) && hi.is_none_or(|hi| v <= hi)
        };
        if !within(
            shape.prompt_tokens,
            self.min_prompt_tokens,
            self.max_prompt_tokens,
        ) {
            return false;
        }
        if self.min_output_tokens.is_some() || self.max_output_tokens.is_some() {
            let out = shape.max_tokens.unwrap_or(self.default_output_tokens);
            if !within(out, self.min_output_tokens, self.max_output_tokens) {
                return false;
            }
        }
        match &self.header {
            Some(h) => (shape.header)(&h.name.to_ascii_lowercase()) == Some(h.value.as_str()),
            None => true,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("`name` must not be empty".into());
        }
        for (what, lo, hi) in [
            ("prompt", self.min_prompt_tokens, self.max_prompt_tokens),
            ("output", self.min_output_tokens, self.max_output_tokens),
        ] {
            if let (Some(lo), Some(hi)) = (lo, hi) {
                if lo > hi {
                    return Err(format!(
                        "`min_{what}_tokens` ({lo}) is above `max_{what}_tokens` ({hi})"
                    ));
                }
            }
        }
        if self
            .header
            .as_ref()
            .is_some_and(|h| h.name.trim().is_empty())
        {
            return Err("`header.name` must not be empty".into());
        }
        if self.ttft_slo_ms == Some(0) {
            return Err("`ttft_slo_ms` must be > 0".into());
        }
        Ok(())
    }
}

/// The outcome of classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification<'a> {
    /// Class name (`default` when no rule matched).
    pub class: &'a str,
    /// Pool the request goes to.
    pub pool: &'a str,
    /// Output tokens to plan for: the request's own `max_tokens`, else the class default.
    pub max_tokens: u32,
    /// The class's TTFT objective (`None`: the pool's default applies).
    pub ttft_slo_ms: Option<u64>,
}

/// Class name used when no configured rule matches.
pub const DEFAULT_CLASS: &str = "default";

/// An ordered, validated list of class rules.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    rules: Vec<ClassRule>,
}

impl Classifier {
    /// Validates `rules` (unique names, sane ranges) and keeps their order.
    pub fn new(rules: Vec<ClassRule>) -> Result<Self, PolicyError> {
        for (i, r) in rules.iter().enumerate() {
            r.validate().map_err(|message| PolicyError::Invalid {
                origin: format!("classes[{i}]"),
                key: r.name.clone(),
                message,
            })?;
            if rules[..i].iter().any(|p| p.name == r.name) {
                return Err(PolicyError::Invalid {
                    origin: format!("classes[{i}]"),
                    key: "name".into(),
                    message: format!("class `{}` is defined twice", r.name),
                });
            }
        }
        Ok(Self { rules })
    }

    /// The rules in order.
    pub fn rules(&self) -> &[ClassRule] {
        &self.rules
    }

    /// First rule that matches `shape` and whose pool `eligible` accepts;
    /// otherwise the `default` class on `fallback_pool` (when there is one).
    pub fn classify<'a>(
        &'a self,
        shape: &RequestShape<'_>,
        eligible: impl Fn(&str) -> bool,
        fallback_pool: Option<&'a str>,
    ) -> Option<Classification<'a>> {
        match self
            .rules
            .iter()
            .find(|r| eligible(&r.pool) && r.matches(shape))
        {
            Some(r) => Some(Classification {
                class: &r.name,
                pool: &r.pool,
                max_tokens: shape.max_tokens.unwrap_or(r.default_output_tokens),
                ttft_slo_ms: r.ttft_slo_ms,
            }),
            None => fallback_pool.map(|pool| Classification {
                class: DEFAULT_CLASS,
                pool,
                max_tokens: shape.max_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
                ttft_slo_ms: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(name: &str, pool: &str) -> ClassRule {
        ClassRule {
            name: name.into(),
            pool: pool.into(),
            min_prompt_tokens: None,
            max_prompt_tokens: None,
            min_output_tokens: None,
            max_output_tokens: None,
            header: None,
            default_output_tokens: DEFAULT_OUTPUT_TOKENS,
            ttft_slo_ms: None,
        }
    }

    fn no_headers(_: &str) -> Option<&'static str> {
        None
    }

    fn shape(prompt: u32, max: Option<u32>) -> RequestShape<'static> {
        RequestShape {
            prompt_tokens: prompt,
            max_tokens: max,
            header: &no_headers,
        }
    }

    fn table() -> Classifier {
        let batch = ClassRule {
            header: Some(HeaderMatch {
                name: "X-Sluice-Class".into(),
                value: "batch".into(),
            }),
            ..rule("batch", "bulk")
        };
        let chat = ClassRule {
            max_prompt_tokens: Some(2048),
            max_output_tokens: Some(1024),
            ..rule("chat-short", "chat")
        };
        let rag = ClassRule {
            min_prompt_tokens: Some(2049),
            default_output_tokens: 300,
            ttft_slo_ms: Some(1500),
            ..rule("rag-long", "rag")
        };
        Classifier::new(vec![batch, chat, rag]).unwrap()
    }

    #[test]
    fn first_matching_rule_wins_in_order() {
        let c = table();
        let all = |_: &str| true;
        assert_eq!(
            c.classify(&shape(100, Some(50)), all, None).unwrap().class,
            "chat-short"
        );
        let long = c.classify(&shape(5000, None), all, None).unwrap();
        assert_eq!(
            (long.class, long.pool, long.max_tokens, long.ttft_slo_ms),
            ("rag-long", "rag", 300, Some(1500))
        );
        // Short prompt but long output: chat-short's output bound excludes it; rag needs a long prompt.
        assert!(c.classify(&shape(100, Some(4000)), all, None).is_none());
        assert_eq!(
            c.classify(&shape(100, Some(4000)), all, Some("chat"))
                .unwrap()
                .class,
            DEFAULT_CLASS
        );
    }

    #[test]
    fn header_rule_matches_case_insensitive_name_exact_value() {
        let c = table();
        let hdr = |n: &str| (n == "x-sluice-class").then_some("batch");
        let s = RequestShape {
            prompt_tokens: 10,
            max_tokens: None,
            header: &hdr,
        };
        assert_eq!(c.classify(&s, |_| true, None).unwrap().pool, "bulk");
        let other = |n: &str| (n == "x-sluice-class").then_some("Batch");
        let s = RequestShape {
            prompt_tokens: 10,
            max_tokens: None,
            header: &other,
        };
        assert_eq!(c.classify(&s, |_| true, None).unwrap().class, "chat-short");
    }

    #[test]
    fn ineligible_pools_are_skipped() {
        let c = table();
        let only_rag = |p: &str| p == "rag";
        assert!(c.classify(&shape(100, None), only_rag, None).is_none());
        assert_eq!(
            c.classify(&shape(100, None), only_rag, Some("rag"))
                .unwrap(),
            Classification {
                class: DEFAULT_CLASS,
                pool: "rag",
                max_tokens: DEFAULT_OUTPUT_TOKENS,
                ttft_slo_ms: None,
            }
        );
    }

    #[test]
    fn invalid_rules_are_rejected() {
        let bad = ClassRule {
            min_prompt_tokens: Some(10),
            max_prompt_tokens: Some(5),
            ..rule("x", "p")
        };
        let err = Classifier::new(vec![bad]).unwrap_err().to_string();
        assert!(err.contains("min_prompt_tokens"), "{err}");
        let err = Classifier::new(vec![rule("a", "p"), rule("a", "q")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("defined twice"), "{err}");
        let no_time = ClassRule {
            ttft_slo_ms: Some(0),
            ..rule("x", "p")
        };
        let err = Classifier::new(vec![no_time]).unwrap_err().to_string();
        assert!(err.contains("ttft_slo_ms"), "{err}");
        let parsed: ClassRule =
            toml::from_str("name = \"c\"\npool = \"p\"\nttft_slo_ms = 250").unwrap();
        assert_eq!(parsed.ttft_slo_ms, Some(250));
    }

    proptest! {
        #[test]
        fn prompt_ranges_partition(prompt in 0u32..100_000) {
            let c = table();
            let got = c.classify(&shape(prompt, Some(10)), |_| true, None).unwrap();
            let want = if prompt <= 2048 { "chat-short" } else { "rag-long" };
            prop_assert_eq!(got.class, want);
        }
    }
}
