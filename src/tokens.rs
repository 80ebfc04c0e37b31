//! Token counting for budgets and summaries: whitespace words, or the tokens of a Hugging Face
//! tokenizer.json (the LM's own tokenizer gives budgets in the units a trainer counts).
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// How tokens are counted (`[tokens]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// "whitespace", or the path of a Hugging Face tokenizer.json whose tokens are counted.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            tokenizer: default_tokenizer(),
        }
    }
}

fn default_tokenizer() -> String {
    "whitespace".into()
}

pub enum TokenCounter {
    Whitespace,
    Tokenizer(Box<tokenizers::Tokenizer>),
}

impl TokenCounter {
    pub fn from_spec(spec: &str) -> Result<TokenCounter> {
        if spec == "whitespace" {
            return Ok(TokenCounter::Whitespace);
        }
        let path = Path::new(spec);
        let mut tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("tokens.tokenizer: cannot load {}", path.display()))?;
        // Budgets count every token of a document, so never truncate.
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("disabling truncation")?;
        tokenizer.with_padding(None);
        Ok(TokenCounter::Tokenizer(Box::new(tokenizer)))
    }

    pub fn count(&self, text: &str) -> u32 {
        match self {
            TokenCounter::Whitespace => text.split_whitespace().count() as u32,
            TokenCounter::Tokenizer(tokenizer) => match tokenizer.encode_fast(text, false) {
                Ok(encoding) => encoding.len() as u32,
                // A text the tokenizer cannot handle still costs its words.
                Err(_) => text.split_whitespace().count() as u32,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_counts_words() {
        let counter = TokenCounter::from_spec("whitespace").unwrap();
        assert_eq!(counter.count("  the quick\tbrown\nfox "), 4);
        assert_eq!(counter.count(""), 0);
    }

    #[test]
    fn missing_tokenizer_file_is_a_clear_error() {
        let err = TokenCounter::from_spec("/nonexistent/tokenizer.json")
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("/nonexistent/tokenizer.json"));
    }
}
