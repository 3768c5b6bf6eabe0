//! Prompt contents and request bodies.
//!
//! By default a prompt is an array of token ids sent to `/v1/completions`, so servers that accept token-id prompts
//! (vLLM, cleave) see exactly the planned length. Ids are drawn uniformly from `lo..vocab_size` with
//! `lo = min(1000, vocab_size / 4)`: low ids hold special and byte-fallback tokens in Llama 2/Mistral vocabularies,
//! and a `vocab_size` of 32000 (the default) stays below the specials that Llama 3 and Qwen put at the top. For
//! cleave's byte-tokenizer presets pass `--vocab-size 256`.
//!
//! Each request's prompt is drawn from its own ChaCha8 stream, so it depends only on the seed, the request's index
//! (offset per run of a rate sweep, so that no run finds an earlier run's prompts in a prefix cache) and its length. Right after the shared prefix (`--shared-prefix-len`, the same ids for every request) come the
//! digits of the request's index in base `vocab_size - lo` (fixed width: 6 for `--vocab-size 256`, 3 for 32000), so
//! no two requests share more than the prefix and prefix caches cannot help unless asked to.
//!
//! `--prompt-format text` sends words instead: a fixed list of common English words, each about one token in BPE
//! vocabularies, so the length is approximate (the record keeps the server's own `prompt_tokens`). A ShareGPT
//! workload in text format sends the conversation's real first turn.

use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};

use crate::workload::{RequestPlan, STREAM_PROMPT_BASE, STREAM_SHARED_PREFIX, stream};

/// The lowest token id drawn is `min(TOKEN_ID_LOW_MAX, vocab_size / 4)`.
pub const TOKEN_ID_LOW_MAX: u32 = 1000;
/// The largest request index whose prompt is guaranteed unique (the probe request uses it).
pub const REQUEST_IDX_MAX: u64 = 1 << 40;
/// Prompt indices reserved per run of a sweep (more requests than any run sends).
const RUN_PROMPT_STRIDE: usize = 1 << 28;
/// The smallest `--vocab-size` (a byte vocabulary).
pub const VOCAB_SIZE_MIN: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// POST /v1/completions.
    Completions,
    /// POST /v1/chat/completions, one user message (text prompts only).
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// Token-id arrays (completions only).
    Tokens,
    /// Text.
    Text,
}

/// Everything about a request body that is the same for every request of a run.
#[derive(Clone, Debug, Serialize)]
pub struct BodyConfig {
    pub endpoint: Endpoint,
    pub format: PromptFormat,
    /// Per target (see `report::Run::model`), so not part of the configuration written out.
    #[serde(skip)]
    pub model: String,
    pub vocab_size: u32,
    pub shared_prefix_len: u32,
    pub temperature: f64,
    pub seed: u64,
    /// Which run of a sweep: prompt contents differ per run (same lengths), or a later rate would find the
    /// prompts of an earlier one in the server's prefix cache.
    #[serde(skip)]
    pub run: u64,
    /// Fields merged into every body last (`--extra-body`), overriding ours.
    pub extra: serde_json::Map<String, Value>,
}

/// Builds request bodies. Holds the shared prefix, drawn once.
pub struct BodyBuilder {
    config: BodyConfig,
    prefix: Vec<u32>,
}

impl BodyBuilder {
    pub fn new(config: BodyConfig) -> BodyBuilder {
        let mut rng = stream(config.seed, STREAM_SHARED_PREFIX);
        let (lo, hi) = id_range(config.vocab_size);
        let prefix = (0..config.shared_prefix_len)
            .map(|_| rng.random_range(lo..hi))
            .collect();
        BodyBuilder { config, prefix }
    }

    /// The index a request's prompt is drawn for: its own, offset per run of a sweep.
    fn prompt_idx(&self, idx: usize) -> usize {
        idx + (self.config.run as usize) * RUN_PROMPT_STRIDE
    }

    /// The JSON body of one request.
    pub fn body(&self, plan: &RequestPlan) -> Vec<u8> {
        let config = &self.config;
        let prompt = match (config.format, &plan.text) {
            (PromptFormat::Tokens, _) => json!(self.token_ids(self.prompt_idx(plan.idx), plan.input_len)),
            (PromptFormat::Text, Some(text)) => json!(text),
            (PromptFormat::Text, None) => json!(self.words(self.prompt_idx(plan.idx), plan.input_len)),
        };
        let mut body = json!({
            "model": config.model,
            "max_tokens": plan.output_len,
            "min_tokens": plan.output_len,
            "ignore_eos": true,
            "temperature": config.temperature,
            "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true},
        });
        let fields = body.as_object_mut().expect("a JSON object");
        match config.endpoint {
            Endpoint::Completions => fields.insert("prompt".into(), prompt),
            Endpoint::Chat => fields.insert("messages".into(), json!([{"role": "user", "content": prompt}])),
        };
        for (key, value) in &config.extra {
            fields.insert(key.clone(), value.clone());
        }
        serde_json::to_vec(&body).expect("JSON values serialize")
    }

    /// `len` token ids: the shared prefix, the request's index as fixed-width digits, then random ids.
    pub fn token_ids(&self, idx: usize, len: u32) -> Vec<u32> {
        let (lo, hi) = id_range(self.config.vocab_size);
        let len = len as usize;
        let mut ids: Vec<u32> = self.prefix.iter().copied().take(len).collect();
        let base = u64::from(hi - lo);
        let mut rest = idx as u64;
        for _ in 0..index_digits(base) {
            if ids.len() == len {
                break;
            }
            ids.push(lo + (rest % base) as u32);
            rest /= base;
        }
        let mut rng = stream(self.config.seed, STREAM_PROMPT_BASE + idx as u64);
        ids.extend((ids.len()..len).map(|_| rng.random_range(lo..hi)));
        ids
    }

    /// About `len` tokens of words: the shared prefix's words, the request's index, then random words.
    pub fn words(&self, idx: usize, len: u32) -> String {
        let word = |id: u32| WORDS[id as usize % WORDS.len()];
        let mut words: Vec<&str> = self.prefix.iter().take(len as usize).map(|&id| word(id)).collect();
        let idx_text = idx.to_string();
        if words.len() < len as usize {
            words.push(&idx_text);
        }
        let mut rng = stream(self.config.seed, STREAM_PROMPT_BASE + idx as u64);
        while words.len() < len as usize {
            words.push(WORDS[rng.random_range(0..WORDS.len())]);
        }
        words.join(" ")
    }
}

/// Request indices are written with this many digits in `base`: enough for any index up to [`REQUEST_IDX_MAX`].
fn index_digits(base: u64) -> usize {
    let mut digits = 1;
    let mut span = base;
    while span <= REQUEST_IDX_MAX {
        span = span.saturating_mul(base);
        digits += 1;
    }
    digits
}

fn id_range(vocab_size: u32) -> (u32, u32) {
    (TOKEN_ID_LOW_MAX.min(vocab_size / 4), vocab_size)
}

/// Common English words, each one token in the usual BPE vocabularies when preceded by a space.
const WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "time", "people", "year", "way", "day", "man", "thing", "world", "life", "hand", "part", "child", "eye", "place",
    "work", "week",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(format: PromptFormat, vocab_size: u32, shared_prefix_len: u32, seed: u64) -> BodyBuilder {
        BodyBuilder::new(BodyConfig {
            run: 0,
            endpoint: Endpoint::Completions,
            format,
            model: "m".into(),
            vocab_size,
            shared_prefix_len,
            temperature: 0.0,
            seed,
            extra: Default::default(),
        })
    }

    #[test]
    fn each_run_of_a_sweep_gets_its_own_prompts() {
        let first = builder(PromptFormat::Tokens, 32000, 0, 5);
        let second = BodyBuilder::new(BodyConfig {
            run: 1,
            ..first.config.clone()
        });
        let (a, b) = (first.body(&plan(3, 400)), second.body(&plan(3, 400)));
        assert_ne!(a, b, "a later rate would hit the prefix cache filled by an earlier one");
        let ids = |body: &[u8]| {
            serde_json::from_slice::<Value>(body).unwrap()["prompt"]
                .as_array()
                .unwrap()
                .len()
        };
        assert_eq!((ids(&a), ids(&b)), (400, 400));
        assert_eq!(
            a,
            builder(PromptFormat::Tokens, 32000, 0, 5).body(&plan(3, 400)),
            "still seeded"
        );
    }

    fn plan(idx: usize, input_len: u32) -> RequestPlan {
        RequestPlan {
            idx,
            at_s: 0.0,
            input_len,
            output_len: 9,
            text: None,
        }
    }

    #[test]
    fn token_prompts_have_exact_lengths_in_range_and_are_unique() {
        let b = builder(PromptFormat::Tokens, 256, 0, 1);
        let prompts: Vec<Vec<u32>> = (0..3000).map(|i| b.token_ids(i, 40)).collect();
        for p in &prompts {
            assert_eq!(p.len(), 40);
            assert!(
                p.iter().all(|&id| (64..256).contains(&id)),
                "ids avoid the byte vocabulary's low quarter"
            );
        }
        // Six index digits in base 192 make the first six tokens unique.
        let mut heads: Vec<&[u32]> = prompts.iter().map(|p| &p[..6]).collect();
        heads.sort();
        heads.dedup();
        assert_eq!(heads.len(), prompts.len());
        let b = builder(PromptFormat::Tokens, 32000, 0, 1);
        assert!(b.token_ids(5, 1000).iter().all(|&id| (1000..32000).contains(&id)));
        assert_eq!(b.token_ids(5, 4)[..3], [1005, 1000, 1000]);
        assert_eq!(index_digits(192), 6);
        assert_eq!(index_digits(31000), 3);
    }

    #[test]
    fn shared_prefix_is_common_and_the_rest_differs() {
        let b = builder(PromptFormat::Tokens, 32000, 100, 1);
        let (x, y) = (b.token_ids(0, 300), b.token_ids(1, 300));
        assert_eq!(x[..100], y[..100]);
        assert_ne!(x[100], y[100]);
        assert!(x[101..].iter().zip(&y[101..]).filter(|(a, b)| a == b).count() < 5);
        // A prompt shorter than the prefix is a prefix of it.
        assert_eq!(b.token_ids(7, 30)[..], x[..30]);
    }

    #[test]
    fn prompts_depend_only_on_seed_index_and_length() {
        let (a, b) = (
            builder(PromptFormat::Tokens, 32000, 8, 1),
            builder(PromptFormat::Tokens, 32000, 8, 1),
        );
        assert_eq!(a.body(&plan(3, 50)), b.body(&plan(3, 50)));
        let c = builder(PromptFormat::Tokens, 32000, 8, 2);
        assert_ne!(a.token_ids(3, 50), c.token_ids(3, 50));
        let (a, c) = (
            builder(PromptFormat::Text, 32000, 0, 1),
            builder(PromptFormat::Text, 32000, 0, 2),
        );
        assert_eq!(a.words(3, 50), builder(PromptFormat::Text, 32000, 0, 1).words(3, 50));
        assert_ne!(a.words(3, 50), c.words(3, 50));
        assert_eq!(a.words(3, 50).split(' ').count(), 50);
    }

    #[test]
    fn bodies_pin_the_output_length_and_ask_for_usage() {
        let mut b = builder(PromptFormat::Tokens, 256, 0, 1);
        b.config.extra.insert("temperature".into(), json!(0.7));
        let body: Value = serde_json::from_slice(&b.body(&plan(0, 3))).unwrap();
        assert_eq!(body["prompt"].as_array().unwrap().len(), 3);
        assert_eq!(
            (body["max_tokens"].as_u64(), body["min_tokens"].as_u64()),
            (Some(9), Some(9))
        );
        assert_eq!(body["ignore_eos"], json!(true));
        assert_eq!(
            body["stream_options"],
            json!({"include_usage": true, "continuous_usage_stats": true})
        );
        assert_eq!(body["temperature"], json!(0.7), "--extra-body overrides");
        b.config.endpoint = Endpoint::Chat;
        b.config.format = PromptFormat::Text;
        let mut p = plan(0, 3);
        p.text = Some("hello".into());
        let body: Value = serde_json::from_slice(&b.body(&p)).unwrap();
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hello"}]));
        assert!(body.get("prompt").is_none());
    }
}
