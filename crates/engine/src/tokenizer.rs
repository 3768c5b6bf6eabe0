//! Text ↔ token ids: Hugging Face `tokenizer.json` through the `tokenizers` crate, or a built-in byte-level tokenizer
//! for presets. Byte-level BPE files (GPT-2, Llama 3, Qwen2 families) are encoded by [`byte_bpe`], which gives the ids
//! `tokenizers` gives several times faster and declines, at load, any file it does not reproduce exactly.
//! [`IncrementalDecoder`] turns a growing list of ids into text deltas that never split a UTF-8 character;
//! [`StopStrings`] finds stop strings across token boundaries while streaming.

mod byte_bpe;
mod split;

use std::path::Path;

use crate::error::{Error, Result};

/// Ids of the built-in byte tokenizer: bytes are 0..=255, then these.
pub const BYTE_BOS: u32 = 256;
pub const BYTE_EOS: u32 = 257;
pub const BYTE_VOCAB: usize = 258;

pub enum Tokenizer {
    /// A `tokenizer.json`, decoded by the `tokenizers` crate and encoded by it or, for byte-level BPE files it
    /// reproduces exactly, by the faster [`byte_bpe`] encoder.
    HuggingFace(Box<HuggingFace>),
    /// One token per byte, plus BOS and EOS. Ids past [`BYTE_VOCAB`] (presets may have larger vocabularies) decode to
    /// nothing.
    Bytes,
}

pub struct HuggingFace {
    tokenizer: tokenizers::Tokenizer,
    /// Present when it encodes this file exactly as `tokenizer` does.
    fast: Option<byte_bpe::ByteLevelBpe>,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&json).map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))
    }

    /// A tokenizer from the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let tokenizer: tokenizers::Tokenizer = json.parse().map_err(|e| Error::Tokenizer(format!("{e}")))?;
        let fast = match byte_bpe::ByteLevelBpe::new(&tokenizer) {
            Ok(fast) => Some(fast),
            Err(byte_bpe::Unsupported(reason)) => {
                tracing::info!("encoding with the tokenizers crate, not the byte-level BPE encoder: {reason}");
                None
            }
        };
        Ok(Self::HuggingFace(Box::new(HuggingFace { tokenizer, fast })))
    }

    /// Whether encoding takes the fast path: the byte tokenizer, or a `tokenizer.json` that the byte-level BPE encoder
    /// reproduces. Encoding is exact either way; this says how long it takes (a few µs per kB instead of ~150).
    pub fn encodes_fast(&self) -> bool {
        match self {
            Self::HuggingFace(hf) => hf.fast.is_some(),
            Self::Bytes => true,
        }
    }

    /// Token ids of `text`, with the special tokens (BOS) the tokenizer's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`; special tokens (BOS) only if `add_special_tokens` (a chat template writes its own).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match self {
            Self::HuggingFace(hf) => match &hf.fast {
                Some(fast) => Ok(fast.encode(text, add_special_tokens)),
                None => self.encode_with_tokenizers_crate(text, add_special_tokens),
            },
            Self::Bytes => {
                let bos = add_special_tokens.then_some(BYTE_BOS);
                Ok(bos.into_iter().chain(text.bytes().map(u32::from)).collect())
            }
        }
    }

    /// [`Self::encode_with`] through the `tokenizers` crate even where the fast encoder would serve: the reference, for
    /// benchmarks and checks.
    pub fn encode_with_tokenizers_crate(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match self {
            Self::HuggingFace(hf) => hf
                .tokenizer
                .encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(format!("encode: {e}"))),
            Self::Bytes => self.encode_with(text, add_special_tokens),
        }
    }

    /// Text of `ids` without special tokens. Invalid UTF-8 (a character cut short) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::HuggingFace(hf) => hf
                .tokenizer
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(format!("decode: {e}"))),
            Self::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter(|&&id| id < 256).map(|&id| id as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }
}

/// Decodes a sequence token by token. Decoding a single token in isolation is wrong for byte-level BPE (a character
/// may span tokens) and for SentencePiece (leading spaces depend on the neighbour), so each step decodes a short
/// window of recent ids and emits only what the window added once it no longer ends in a partial character.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Ids before this have been emitted.
    read_offset: usize,
}

/// A UTF-8 character has at most 4 bytes; a longer run of undecodable ids is genuinely invalid and is emitted as
/// U+FFFD rather than held forever.
const PENDING_IDS_MAX: usize = 4;

impl IncrementalDecoder {
    /// Appends `id` and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        let waiting = full.ends_with('\u{FFFD}') && self.ids.len() - self.read_offset < PENDING_IDS_MAX;
        if full.len() <= prefix.len() || waiting {
            return Ok(String::new());
        }
        let delta = match full.get(prefix.len()..) {
            Some(d) if full.starts_with(&prefix) => d.to_string(),
            // The window's decoding changed earlier text (rare normalisation effects): emit the part past the common
            // prefix so nothing is lost.
            _ => {
                let common = full
                    .char_indices()
                    .zip(prefix.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                full[common..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Text still held back (an incomplete character at the end of generation), as decoded now.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Stop strings matched across deltas. Text that could be the start of a stop string is held back until the next
/// delta decides it, so a streaming client never receives part of a stop string.
pub struct StopStrings {
    stops: Vec<String>,
    /// All text seen; `emitted` bytes of it have been released.
    text: String,
    emitted: usize,
}

pub enum StopCheck {
    /// Release this text; keep going.
    Continue(String),
    /// A stop string matched: release this text (what precedes the stop string) and finish.
    Stopped(String),
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds a delta. While `active` is false (before `min_tokens`), stop strings are not looked for.
    pub fn push(&mut self, delta: &str, active: bool) -> StopCheck {
        self.text.push_str(delta);
        if !active {
            let out = self.text[self.emitted..].to_string();
            self.emitted = self.text.len();
            return StopCheck::Continue(out);
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A match can only start in the last `longest - 1` released bytes or later.
        let mut search_from = self.emitted.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| search_from + i))
            .min();
        if let Some(at) = first_match {
            let out = self.text[self.emitted.min(at)..at].to_string();
            self.emitted = self.emitted.max(at);
            return StopCheck::Stopped(out);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for len in (1..s.len()).rev() {
                if len > hold && s.is_char_boundary(len) && self.text.ends_with(&s[..len]) {
                    hold = len;
                    break;
                }
            }
        }
        let release_to = (self.text.len() - hold).max(self.emitted);
        let out = self.text[self.emitted..release_to].to_string();
        self.emitted = release_to;
        StopCheck::Continue(out)
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_decoding_never_splits_a_character() {
        let tok = Tokenizer::Bytes;
        let text = "naïve 你好 🚀!";
        let mut dec = IncrementalDecoder::default();
        let mut out = String::new();
        for b in text.bytes() {
            let delta = dec.push(&tok, b as u32).unwrap();
            assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} split a character");
            out.push_str(&delta);
        }
        out.push_str(&dec.flush(&tok).unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_are_emitted_as_replacement_not_held_forever() {
        let tok = Tokenizer::Bytes;
        let mut dec = IncrementalDecoder::default();
        let mut out = String::new();
        for id in [0xff, 0xfe, 0xff, 0xfe, 0xff, b'a' as u32] {
            out.push_str(&dec.push(&tok, id).unwrap());
        }
        assert!(out.contains('\u{FFFD}') && out.ends_with('a'), "{out:?}");
    }

    #[test]
    fn stop_string_spanning_deltas_is_cut_and_never_released() {
        let mut stops = StopStrings::new(vec!["STOP".into()]);
        let mut released = String::new();
        for delta in ["hello S", "TO", "P world"] {
            match stops.push(delta, true) {
                StopCheck::Continue(t) => released.push_str(&t),
                StopCheck::Stopped(t) => {
                    released.push_str(&t);
                    assert_eq!(released, "hello ");
                    return;
                }
            }
            assert!(
                !released.contains('S'),
                "released part of the stop string: {released:?}"
            );
        }
        panic!("stop string not found");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_turns_out_not_to_stop() {
        let mut stops = StopStrings::new(vec!["STOP".into()]);
        let StopCheck::Continue(a) = stops.push("ab ST", true) else {
            panic!()
        };
        assert_eq!(a, "ab ");
        let StopCheck::Continue(b) = stops.push("ART", true) else {
            panic!()
        };
        assert_eq!(b, "START");
        assert_eq!(stops.finish(), "");
    }
}
