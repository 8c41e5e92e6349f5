//! Who is asking: API key → tenant.
//!
//! Keys are kept only as SHA-256 digests (from the file, or hashed at load
//! from environment variables), so neither the config nor a heap dump holds
//! a usable key. A lookup hashes the presented key and finds the digest.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sluice_policies::admission::Priority;
use sluice_policies::quota::TenantLimits;

use crate::config_tenants::{AuthConfig, TenantConfig, parse_digest};

/// Name of the tenant every request belongs to when no tenants are configured.
pub const DEFAULT_TENANT: &str = "default";

/// A tenant as the request path uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// Name (metrics, lifecycle, Redis keys).
    pub name: String,
    /// Admission priority band.
    pub priority: Priority,
    /// `fair` queue weight.
    pub weight: f64,
    /// Allowed models; empty means all.
    pub models: Vec<String>,
    /// vLLM `cache_salt` forced on this tenant's requests (cache isolation).
    pub cache_salt: Option<String>,
    /// Quota limits.
    pub limits: TenantLimits,
}

impl Tenant {
    /// The unlimited tenant used when authentication is off.
    pub fn unlimited() -> Self {
        Self {
            name: DEFAULT_TENANT.into(),
            priority: Priority::Standard,
            weight: 1.0,
            models: Vec::new(),
            cache_salt: None,
            limits: TenantLimits::default(),
        }
    }

    /// Whether the tenant may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == "*" || m == model)
    }

    /// The salt for a forwarded request: the tenant's own, combined with a
    /// salt the client sent (so a client can still split its own namespace,
    /// but never reach another tenant's).
    pub fn effective_salt(&self, client_salt: Option<&str>) -> Option<String> {
        match (&self.cache_salt, client_salt) {
            (Some(t), Some(c)) => Some(format!("{t}:{}", hex(&Sha256::digest(c.as_bytes())))),
            (Some(t), None) => Some(t.clone()),
            (None, c) => c.map(str::to_string),
        }
    }
}

/// Why a request could not be tied to a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No key and no anonymous tenant.
    Missing,
    /// A key that matches no tenant (or a malformed header).
    Unknown,
}

impl AuthFailure {
    /// Message for the 401 body (OpenAI's wording).
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => {
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            }
            AuthFailure::Unknown => "Incorrect API key provided.",
        }
    }

    /// Metric / lifecycle label.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_api_key",
            AuthFailure::Unknown => "invalid_api_key",
        }
    }
}

/// The tenants of one config generation.
#[derive(Debug)]
pub struct Directory {
    by_digest: HashMap<[u8; 32], Arc<Tenant>>,
    by_name: HashMap<String, Arc<Tenant>>,
    anonymous: Option<Arc<Tenant>>,
    default: Arc<Tenant>,
}

impl Directory {
    /// Builds the directory; reads `api_key_env` variables through `env`.
    pub fn build(
        tenants: &[TenantConfig],
        auth: &AuthConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut by_digest = HashMap::new();
        let mut by_name = HashMap::new();
        for t in tenants {
            let tenant = Arc::new(Tenant {
                name: t.name.clone(),
                priority: t.priority,
                weight: t.weight,
                models: t.models.clone(),
                cache_salt: t.cache_isolation.then(|| {
                    format!(
                        "sluice-tenant-{}",
                        &hex(&Sha256::digest(t.name.as_bytes()))[..32]
                    )
                }),
                limits: t.limits,
            });
            let mut digests = Vec::new();
            for d in &t.api_key_sha256 {
                digests.push(parse_digest(d).ok_or_else(|| {
                    format!(
                        "tenant `{}`: api_key_sha256 `{d}` is not 64 hex digits",
                        t.name
                    )
                })?);
            }
            for var in &t.api_key_env {
                let key = env(var).filter(|k| !k.trim().is_empty()).ok_or_else(|| {
                    format!(
                        "tenant `{}`: environment variable `{var}` (api_key_env) is not set",
                        t.name
                    )
                })?;
                digests.push(digest(key.trim()));
            }
            for d in digests {
                if let Some(other) = by_digest.insert(d, Arc::clone(&tenant))
                    && other.name != tenant.name
                {
                    return Err(format!(
                        "one API key belongs to both tenant `{}` and `{}`",
                        other.name, tenant.name
                    ));
                }
            }
            by_name.insert(t.name.clone(), tenant);
        }
        let anonymous = match &auth.anonymous_tenant {
            Some(n) => Some(Arc::clone(by_name.get(n).ok_or_else(|| {
                format!("`auth.anonymous_tenant` = `{n}` is not a tenant")
            })?)),
            None => None,
        };
        Ok(Self {
            by_digest,
            by_name,
            anonymous,
            default: Arc::new(Tenant::unlimited()),
        })
    }

    /// Whether requests must carry a key (any tenant configured).
    pub fn enabled(&self) -> bool {
        !self.by_name.is_empty()
    }

    /// All tenants (for metrics and state views).
    pub fn tenants(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_name.values()
    }

    /// The tenant for an `Authorization` header value (or `None` when absent).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, AuthFailure> {
        if !self.enabled() {
            return Ok(Arc::clone(&self.default));
        }
        let key = match authorization.map(str::trim) {
            None | Some("") => {
                return self.anonymous.clone().ok_or(AuthFailure::Missing);
            }
            Some(v) => bearer(v).ok_or(AuthFailure::Unknown)?,
        };
        self.by_digest
            .get(&digest(key))
            .cloned()
            .ok_or(AuthFailure::Unknown)
    }
}

/// The request body with `cache_salt` and/or the output cap replaced, or
/// `None` when it is not a JSON object (the parser accepted it, so this does
/// not happen in practice).
pub fn rewrite_body(raw: &[u8], salt: Option<&str>, max_tokens: Option<u32>) -> Option<Vec<u8>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(raw).ok()?;
    if let Some(s) = salt {
        v.insert("cache_salt".into(), s.into());
    }
    if let Some(m) = max_tokens {
        let mut set = false;
        for k in ["max_tokens", "max_completion_tokens"] {
            if v.contains_key(k) {
                v.insert(k.into(), m.into());
                set = true;
            }
        }
        if !set {
            v.insert("max_tokens".into(), m.into());
        }
    }
    serde_json::to_vec(&v).ok()
}

/// The token of `Bearer TOKEN` (scheme case-insensitive).
fn bearer(v: &str) -> Option<&str> {
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// SHA-256 of a key.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, keys: &[&str], env: &[&str]) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            api_key_sha256: keys.iter().map(|k| hex(&digest(k))).collect(),
            api_key_env: env.iter().map(|s| s.to_string()).collect(),
            models: Vec::new(),
            priority: Priority::Standard,
            weight: 1.0,
            cache_isolation: false,
            limits: TenantLimits::default(),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn keys_map_to_tenants() {
        let env = |v: &str| (v == "B_KEY").then(|| "sk-b".to_string());
        let d = Directory::build(
            &[tenant("a", &["sk-a"], &[]), tenant("b", &[], &["B_KEY"])],
            &AuthConfig::default(),
            &env,
        )
        .unwrap();
        assert_eq!(d.authenticate(Some("Bearer sk-a")).unwrap().name, "a");
        assert_eq!(d.authenticate(Some("bearer  sk-b ")).unwrap().name, "b");
        assert_eq!(
            d.authenticate(Some("Bearer sk-c")).unwrap_err(),
            AuthFailure::Unknown
        );
        assert_eq!(
            d.authenticate(Some("sk-a")).unwrap_err(),
            AuthFailure::Unknown
        );
        assert_eq!(d.authenticate(None).unwrap_err(), AuthFailure::Missing);
    }

    #[test]
    fn anonymous_and_disabled() {
        let d = Directory::build(
            &[tenant("a", &["sk-a"], &[]), tenant("free", &[], &[])],
            &AuthConfig {
                anonymous_tenant: Some("free".into()),
            },
            &no_env,
        )
        .unwrap();
        assert_eq!(d.authenticate(None).unwrap().name, "free");
        assert_eq!(
            d.authenticate(Some("Bearer nope")).unwrap_err(),
            AuthFailure::Unknown,
            "a wrong key is not anonymous"
        );
        let off = Directory::build(&[], &AuthConfig::default(), &no_env).unwrap();
        assert!(!off.enabled());
        assert_eq!(off.authenticate(None).unwrap().name, DEFAULT_TENANT);
    }

    #[test]
    fn missing_env_and_shared_keys_are_errors() {
        let e = Directory::build(
            &[tenant("a", &[], &["NOPE"])],
            &AuthConfig::default(),
            &no_env,
        )
        .unwrap_err();
        assert!(e.contains("NOPE"), "{e}");
        let e = Directory::build(
            &[tenant("a", &["k"], &[]), tenant("b", &["k"], &[])],
            &AuthConfig::default(),
            &no_env,
        )
        .unwrap_err();
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn bodies_get_salt_and_cap() {
        let b = rewrite_body(
            br#"{"model":"m","max_completion_tokens":90,"cache_salt":"x"}"#,
            Some("s"),
            Some(8),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (
                v["cache_salt"].as_str(),
                v["max_completion_tokens"].as_u64()
            ),
            (Some("s"), Some(8))
        );
        assert!(v.get("max_tokens").is_none());
        let b = rewrite_body(br#"{"model":"m"}"#, None, Some(8)).unwrap();
        assert!(String::from_utf8(b).unwrap().contains("\"max_tokens\":8"));
        assert!(rewrite_body(b"[1]", Some("s"), None).is_none());
    }

    #[test]
    fn salts_separate_tenants() {
        let mut cfg = tenant("a", &["k"], &[]);
        cfg.cache_isolation = true;
        let d = Directory::build(&[cfg], &AuthConfig::default(), &no_env).unwrap();
        let a = d.authenticate(Some("Bearer k")).unwrap();
        let s = a.effective_salt(None).unwrap();
        assert!(s.starts_with("sluice-tenant-"));
        assert_ne!(a.effective_salt(Some("x")), Some("x".into()));
        assert_eq!(
            Tenant::unlimited().effective_salt(Some("x")),
            Some("x".into())
        );
    }
}
