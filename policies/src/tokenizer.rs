//! Prompt token ids: a real Hugging Face tokenizer when one is configured,
//! the deterministic estimate of [`crate::tokens`] otherwise.
//!
//! The proxy counts and hashes prompts with it and the simulator caches them
//! with it; both sides must be given the same `tokenizer.json` (or none) for
//! their prefix block hashes to agree, just as a real router must tokenize
//! like the engine behind it.

use std::path::Path;
use std::sync::Arc;

use crate::PolicyError;
use crate::tokens::{estimate_token_count, estimate_token_ids};

/// Turns prompt text into token ids.
#[derive(Clone, Default)]
pub enum Tokenizer {
    /// Word-piece estimate, no vocabulary file (see [`crate::tokens`]).
    #[default]
    Estimate,
    /// A Hugging Face `tokenizer.json`.
    HuggingFace(Arc<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let tok = tokenizers::Tokenizer::from_bytes(&text).map_err(|e| PolicyError::Parse {
            origin: path.display().to_string(),
            message: format!("not a Hugging Face tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer::HuggingFace(Arc::new(tok)))
    }

    /// `estimate` or `huggingface`, for logs and `sluice check`.
    pub fn kind(&self) -> &'static str {
        match self {
            Tokenizer::Estimate => "estimate",
            Tokenizer::HuggingFace(_) => "huggingface",
        }
    }

    /// Token ids of `text`, without special tokens (the chat rendering
    /// already spells its markers out as text).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Estimate => estimate_token_ids(text),
            Tokenizer::HuggingFace(t) => match t.encode_fast(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                // A tokenizer that cannot encode some input (a malformed
                // pre-tokenizer regex on odd Unicode) must not fail the request:
                // fall back to the estimate, which only costs cache affinity.
                Err(_) => estimate_token_ids(text),
            },
        }
    }

    /// Number of tokens of `text`.
    pub fn count(&self, text: &str) -> usize {
        match self {
            Tokenizer::Estimate => estimate_token_count(text),
            Tokenizer::HuggingFace(_) => self.encode(text).len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A five-word word-level tokenizer.json, in the format Hugging Face documents.
    const TINY: &str = include_str!("../../fixtures/tokenizers/tiny-wordlevel.json");

    #[test]
    fn loads_and_encodes_a_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, TINY).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.kind(), "huggingface");
        assert_eq!(tok.encode("hello sluice world ."), vec![1, 3, 2, 4]);
        assert_eq!(tok.encode("hello unknown"), vec![1, 0]);
        assert_eq!(tok.count("hello world"), 2);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{\"not\": \"a tokenizer\"}").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a Hugging Face"),
            "{err}"
        );
        let err = Tokenizer::from_file(&dir.path().join("missing.json")).unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }));
    }

    #[test]
    fn estimate_is_the_default() {
        let tok = Tokenizer::default();
        assert_eq!(tok.encode("hello world"), estimate_token_ids("hello world"));
    }
}
