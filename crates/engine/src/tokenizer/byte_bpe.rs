//! Encoding for byte-level BPE `tokenizer.json` files (GPT-2, Llama 3, Qwen2 and their relatives) that gives exactly
//! the ids `tokenizers` gives, several times faster.
//!
//! [`ByteLevelBpe::new`] inspects a loaded `tokenizers::Tokenizer` and accepts it only if every stage of its
//! `encode` is one this module reproduces: added tokens split out first (aho-corasick, leftmost-longest, as
//! `tokenizers` does), no normalizer or NFC, a pre-tokenizer split that [`SplitPattern`] knows, byte-level BPE with
//! every byte in the vocabulary, and a post-processor that only adds fixed ids around the sequence. Anything else is
//! refused with the reason, and the caller keeps using `tokenizers`.
//!
//! Why by hand: no crate does HF's merge semantics on HF's files. `tiktoken-rs` and GitHub's `bpe`/`bpe-openai` rank
//! merges by the merged token's id (tiktoken's scheme), which differs from `tokenizers`' list of pair merges wherever
//! two pairs make the same token, and their pre-tokenizers are fancy-regex again or cover only OpenAI's patterns.
//! What is reused: `tokenizers` itself for the file format, NFC and the post-processor (probed once at load),
//! `aho-corasick` for added tokens, `regex-syntax`'s Unicode tables for the split.
//!
//! Where the time goes in `tokenizers` and what replaces it: the backtracking split (→ [`split`](super::split)), a
//! `String` per piece and per token plus offsets (→ pieces are borrowed slices, ids go straight into the output),
//! and a lock-free but per-thread word cache (→ a table, built at load, of every vocabulary entry that BPE turns into
//! itself, so most words are one hash lookup on any thread).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};
use foldhash::fast::FixedState;
use serde_json::Value;
use tokenizers::models::ModelWrapper;
use tokenizers::{Encoding, NormalizedString, Normalizer, NormalizerWrapper, Token};

use super::split::SplitPattern;

/// A tokenizer's encoder, built from the loaded `tokenizers::Tokenizer` it reproduces.
pub(super) struct ByteLevelBpe {
    split: SplitPattern,
    /// The tokenizer's normalizer, when it is NFC (Qwen2): applied to text outside added tokens.
    nfc: Option<NormalizerWrapper>,
    /// Added tokens matched in the raw text, then (`normalized: true` ones) in normalized text between them.
    added_raw: Option<AddedTokens>,
    added_normalized: Option<AddedTokens>,
    /// Id of each byte's one-character token.
    byte_ids: [u32; 256],
    /// Pieces that encode to one token, by their bytes: every vocabulary entry when `ignore_merges`, else those whose
    /// own BPE gives back just themselves.
    whole: HashMap<Box<[u8]>, u32, FixedState>,
    /// `(left << 32) | right` → the merge of that pair.
    merges: HashMap<u64, Merge, FixedState>,
    /// Ids the post-processor puts before and after the sequence, without and with special tokens.
    around: [(Vec<u32>, Vec<u32>); 2],
}

/// Why a tokenizer is left to `tokenizers`.
#[derive(Debug)]
pub(super) struct Unsupported(pub String);

#[derive(Clone, Copy)]
struct Merge {
    /// Position in the merge list: lower merges first.
    rank: u32,
    id: u32,
}

struct AddedTokens {
    automaton: AhoCorasick,
    /// Token id by pattern index.
    ids: Vec<u32>,
}

enum Piece<'t> {
    Added(u32),
    Text(&'t str),
}

/// Buffers for BPE merging, reused across the pieces of one text.
#[derive(Default)]
struct Scratch {
    symbols: Vec<Symbol>,
    /// `(rank, position of the pair's left symbol, merged id)`, lowest rank then leftmost first.
    queue: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

/// One symbol of a word being merged: a doubly linked list over the word's bytes, merged symbols keeping the left
/// one's slot.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: u32,
    next: u32,
    alive: bool,
}

const NONE: u32 = u32::MAX;

fn unsupported<T>(reason: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(reason.into()))
}

impl ByteLevelBpe {
    /// The encoder for `tokenizer`, or why it has none.
    pub(super) fn new(tokenizer: &tokenizers::Tokenizer) -> Result<Self, Unsupported> {
        if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
            return unsupported("truncation or padding is set");
        }
        if tokenizer.get_encode_special_tokens() {
            return unsupported("encode_special_tokens is set");
        }
        let nfc = match tokenizer.get_normalizer() {
            None => None,
            Some(n) if to_json(n)? == serde_json::json!({"type": "NFC"}) => Some(n.clone()),
            Some(n) => return unsupported(format!("normalizer {}", to_json(n)?)),
        };
        let split = match tokenizer.get_pre_tokenizer() {
            Some(p) => split_pattern(&to_json(p)?)?,
            None => return unsupported("no pre-tokenizer"),
        };
        let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
            return unsupported("the model is not BPE");
        };
        if bpe.dropout.is_some_and(|p| p > 0.0) {
            return unsupported("BPE dropout");
        }
        // Affixes change what a merge makes; empty ones (Qwen2 writes "") change nothing.
        if [&bpe.continuing_subword_prefix, &bpe.end_of_word_suffix]
            .iter()
            .any(|a| a.as_deref().is_some_and(|a| !a.is_empty()))
        {
            return unsupported("continuing_subword_prefix or end_of_word_suffix");
        }
        // `unk_token`, `fuse_unk` and `byte_fallback` only act on a character missing from the vocabulary, and
        // byte-level text has none: every byte's character is required below.
        let vocab = bpe.get_vocab();
        let char_bytes = byte_level_bytes();
        let byte_chars = byte_level_chars();
        let mut byte_ids = [0u32; 256];
        for (byte, id) in byte_ids.iter_mut().enumerate() {
            *id = match vocab.get(byte_chars[byte].to_string().as_str()) {
                Some(&id) => id,
                None => return unsupported(format!("byte {byte:#04x} has no token")),
            };
        }
        let merge_list = match to_json(bpe)?.get_mut("merges").map(Value::take) {
            Some(Value::Array(merges)) => merges,
            _ => return unsupported("BPE merges are not a list"),
        };
        let mut merges = HashMap::with_capacity_and_hasher(merge_list.len(), FixedState::default());
        for (rank, pair) in merge_list.iter().enumerate() {
            let (Some(left), Some(right)) = (pair[0].as_str(), pair[1].as_str()) else {
                return unsupported("a BPE merge is not a pair of strings");
            };
            let (Some(&l), Some(&r), Some(&id)) =
                (vocab.get(left), vocab.get(right), vocab.get(&format!("{left}{right}")))
            else {
                return unsupported(format!("merge {left:?} {right:?} is not in the vocabulary"));
            };
            // Like `tokenizers`, a pair listed twice keeps its last rank.
            merges.insert(pair_key(l, r), Merge { rank: rank as u32, id });
        }
        let mut encoder = Self {
            split,
            nfc,
            added_raw: None,
            added_normalized: None,
            byte_ids,
            whole: HashMap::default(),
            merges,
            around: Default::default(),
        };
        encoder.added_tokens(tokenizer)?;
        encoder.around = [false, true].map(|add_special_tokens| probe_post_processor(tokenizer, add_special_tokens));
        for (i, (before, after)) in encoder.around.iter().enumerate() {
            if before.contains(&PROBE_ID) || after.contains(&PROBE_ID) {
                return unsupported(format!(
                    "the post-processor does not just add ids (special tokens: {})",
                    i == 1
                ));
            }
        }
        let mut whole = HashMap::with_capacity_and_hasher(vocab.len(), FixedState::default());
        let mut scratch = Scratch::default();
        let mut merged = Vec::new();
        for (token, &id) in &vocab {
            let Some(bytes) = token.chars().map(&char_bytes).collect::<Option<Vec<u8>>>() else {
                continue; // Not byte-level text (an added token's entry): no piece can spell it.
            };
            if !bpe.ignore_merges {
                merged.clear();
                encoder.merge(&bytes, &mut merged, &mut scratch);
                if merged != [id] {
                    continue;
                }
            }
            whole.insert(bytes.into_boxed_slice(), id);
        }
        encoder.whole = whole;
        Ok(encoder)
    }

    /// The ids of `text`, as `tokenizers::Tokenizer::encode(text, add_special_tokens)` gives them.
    pub(super) fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let (before, after) = &self.around[usize::from(add_special_tokens)];
        // English runs at about four bytes per token.
        let mut ids = Vec::with_capacity(before.len() + text.len() / 3 + after.len() + 4);
        ids.extend_from_slice(before);
        let mut scratch = Scratch::default();
        split_added(self.added_raw.as_ref(), text, |piece| match piece {
            Piece::Added(id) => ids.push(id),
            Piece::Text(text) => self.encode_unnormalized(text, &mut ids, &mut scratch),
        });
        ids.extend_from_slice(after);
        ids
    }

    /// Text between raw added tokens: normalized, then split around normalized added tokens.
    fn encode_unnormalized(&self, text: &str, ids: &mut Vec<u32>, scratch: &mut Scratch) {
        let normalized;
        let text = match &self.nfc {
            // ASCII is its own NFC.
            Some(nfc) if !text.is_ascii() => {
                normalized = normalize(nfc, text);
                normalized.as_str()
            }
            _ => text,
        };
        split_added(self.added_normalized.as_ref(), text, |piece| match piece {
            Piece::Added(id) => ids.push(id),
            Piece::Text(text) => self
                .split
                .for_each_piece(text, |word| self.encode_word(word.as_bytes(), ids, scratch)),
        });
    }

    fn encode_word(&self, word: &[u8], ids: &mut Vec<u32>, scratch: &mut Scratch) {
        match word {
            [byte] => ids.push(self.byte_ids[usize::from(*byte)]),
            _ => match self.whole.get(word) {
                Some(&id) => ids.push(id),
                None => self.merge(word, ids, scratch),
            },
        }
    }

    /// BPE as `tokenizers` does it: repeatedly merge the adjacent pair with the lowest rank, leftmost first. Like
    /// `tokenizers`, a queue holds candidate merges and entries made stale by a neighbour's merge are skipped when
    /// popped (a pair's text only grows, so a stale entry never names the pair now in its place).
    fn merge(&self, word: &[u8], out: &mut Vec<u32>, scratch: &mut Scratch) {
        let Scratch { symbols, queue } = scratch;
        symbols.clear();
        queue.clear();
        let n = word.len() as u32;
        symbols.extend(word.iter().zip(0..).map(|(&byte, i)| Symbol {
            id: self.byte_ids[usize::from(byte)],
            prev: if i == 0 { NONE } else { i - 1 },
            next: if i + 1 == n { NONE } else { i + 1 },
            alive: true,
        }));
        for (i, pair) in symbols.windows(2).enumerate() {
            if let Some(m) = self.pair(pair[0].id, pair[1].id) {
                queue.push(Reverse((m.rank, i as u32, m.id)));
            }
        }
        while let Some(Reverse((_, pos, id))) = queue.pop() {
            let left = symbols[pos as usize];
            if !left.alive || left.next == NONE {
                continue;
            }
            let right = symbols[left.next as usize];
            if self.pair(left.id, right.id).is_none_or(|m| m.id != id) {
                continue;
            }
            symbols[left.next as usize].alive = false;
            symbols[pos as usize].id = id;
            symbols[pos as usize].next = right.next;
            if right.next != NONE {
                symbols[right.next as usize].prev = pos;
                if let Some(m) = self.pair(id, symbols[right.next as usize].id) {
                    queue.push(Reverse((m.rank, pos, m.id)));
                }
            }
            if left.prev != NONE
                && let Some(m) = self.pair(symbols[left.prev as usize].id, id)
            {
                queue.push(Reverse((m.rank, left.prev, m.id)));
            }
        }
        let mut at = 0;
        while at != NONE {
            out.push(symbols[at as usize].id);
            at = symbols[at as usize].next;
        }
    }

    #[inline]
    fn pair(&self, left: u32, right: u32) -> Option<Merge> {
        self.merges.get(&pair_key(left, right)).copied()
    }

    /// The added-token matchers, as `tokenizers`' `AddedVocabulary` builds them.
    fn added_tokens(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<(), Unsupported> {
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (id, token) in tokenizer.get_added_tokens_decoder() {
            if token.single_word || token.lstrip || token.rstrip {
                return unsupported(format!(
                    "added token {:?} is single_word, lstrip or rstrip",
                    token.content
                ));
            }
            if token.content.is_empty() {
                continue;
            }
            if token.normalized {
                let content = match &self.nfc {
                    Some(nfc) => normalize(nfc, &token.content),
                    None => token.content,
                };
                normalized.push((content, id));
            } else {
                raw.push((token.content, id));
            }
        }
        self.added_raw = AddedTokens::new(raw)?;
        self.added_normalized = AddedTokens::new(normalized)?;
        Ok(())
    }
}

impl AddedTokens {
    fn new(mut tokens: Vec<(String, u32)>) -> Result<Option<Self>, Unsupported> {
        if tokens.is_empty() {
            return Ok(None);
        }
        tokens.sort_unstable();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(content, _)| content))
            .or_else(|e| unsupported(format!("added tokens: {e}")))?;
        Ok(Some(Self {
            automaton,
            ids: tokens.into_iter().map(|(_, id)| id).collect(),
        }))
    }
}

/// Calls `f` with the added tokens in `text` and the text between them, in order.
fn split_added<'t>(added: Option<&AddedTokens>, text: &'t str, mut f: impl FnMut(Piece<'t>)) {
    let Some(added) = added else {
        if !text.is_empty() {
            f(Piece::Text(text));
        }
        return;
    };
    let mut start = 0;
    for m in added.automaton.find_iter(text) {
        // Patterns and text are UTF-8, so matches start and end at character boundaries.
        if m.start() > start {
            f(Piece::Text(&text[start..m.start()]));
        }
        f(Piece::Added(added.ids[m.pattern().as_usize()]));
        start = m.end();
    }
    if start < text.len() {
        f(Piece::Text(&text[start..]));
    }
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

fn normalize(normalizer: &NormalizerWrapper, text: &str) -> String {
    let mut s = NormalizedString::from(text);
    // NFC cannot fail.
    match normalizer.normalize(&mut s) {
        Ok(()) => s.get().to_owned(),
        Err(_) => text.to_owned(),
    }
}

fn to_json(value: &impl serde::Serialize) -> Result<Value, Unsupported> {
    serde_json::to_value(value).or_else(|e| unsupported(format!("cannot inspect the tokenizer: {e}")))
}

/// The split of a pre-tokenizer, if it is one [`SplitPattern`] reproduces followed by byte-level mapping.
fn split_pattern(pre_tokenizer: &Value) -> Result<SplitPattern, Unsupported> {
    let byte_level = |v: &Value, use_regex: bool| {
        v["type"] == "ByteLevel"
            && v["add_prefix_space"] == false
            && v["use_regex"] == use_regex
            && has_only(v, &["type", "add_prefix_space", "trim_offsets", "use_regex"])
    };
    if byte_level(pre_tokenizer, true) {
        return Ok(SplitPattern::Gpt2);
    }
    if pre_tokenizer["type"] == "Sequence"
        && has_only(pre_tokenizer, &["type", "pretokenizers"])
        && let Some([split, last]) = pre_tokenizer["pretokenizers"].as_array().map(Vec::as_slice)
        && split["type"] == "Split"
        && split["behavior"] == "Isolated"
        && split["invert"] == false
        && has_only(split, &["type", "pattern", "behavior", "invert"])
        && byte_level(last, false)
        && let Some(pattern) = split["pattern"]["Regex"].as_str().and_then(SplitPattern::from_regex)
    {
        return Ok(pattern);
    }
    unsupported(format!("pre-tokenizer {pre_tokenizer}"))
}

fn has_only(object: &Value, keys: &[&str]) -> bool {
    object
        .as_object()
        .is_some_and(|o| o.keys().all(|k| keys.contains(&k.as_str())))
}

/// An id no tokenizer has, to find the sequence in the post-processor's output.
const PROBE_ID: u32 = u32::MAX - 7;

/// The ids the post-processor puts before and after a sequence. Probed with sequences of one and two ids: a
/// post-processor that does anything but add the same ids around both (truncation, say) gets `PROBE_ID`s into the
/// result, which [`ByteLevelBpe::new`] refuses.
fn probe_post_processor(tokenizer: &tokenizers::Tokenizer, add_special_tokens: bool) -> (Vec<u32>, Vec<u32>) {
    let probe = |n: usize| {
        let tokens = (0..n)
            .map(|i| Token::new(PROBE_ID, String::new(), (i, i + 1)))
            .collect();
        tokenizer
            .post_process(Encoding::from_tokens(tokens, 0), None, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_else(|_| vec![PROBE_ID])
    };
    let (one, two) = (probe(1), probe(2));
    let split = |ids: &[u32], n: usize| -> Option<(Vec<u32>, Vec<u32>)> {
        let at = ids.iter().position(|&id| id == PROBE_ID)?;
        let (before, rest) = ids.split_at(at);
        let after = rest.get(n..)?;
        rest[..n]
            .iter()
            .all(|&id| id == PROBE_ID)
            .then(|| (before.to_vec(), after.to_vec()))
    };
    match (split(&one, 1), split(&two, 2)) {
        (Some(a), Some(b)) if a == b => a,
        _ => (vec![PROBE_ID], Vec::new()),
    }
}

/// GPT-2's byte-to-character map of byte-level BPE: printable Latin-1 bytes stand for themselves, the others (controls,
/// space, U+007F–U+00A0, U+00AD) for U+0100 onwards in byte order.
fn byte_level_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut n_shifted = 0;
    for (byte, c) in (0u32..).zip(chars.iter_mut()) {
        let printable = (0x21..=0x7E).contains(&byte) || (0xA1..=0xAC).contains(&byte) || (0xAE..=0xFF).contains(&byte);
        *c = if printable {
            char::from_u32(byte)
        } else {
            n_shifted += 1;
            char::from_u32(0xFF + n_shifted)
        }
        .expect("Latin-1 and U+0100..U+0144 are characters");
    }
    chars
}

/// The inverse of [`byte_level_chars`].
fn byte_level_bytes() -> impl Fn(char) -> Option<u8> {
    let mut bytes = [None; 0x144];
    for (byte, c) in (0u8..=255).zip(byte_level_chars()) {
        bytes[c as usize] = Some(byte);
    }
    move |c| bytes.get(c as usize).copied().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_the_one_tokenizers_uses() {
        let ours: std::collections::HashSet<char> = byte_level_chars().into_iter().collect();
        let theirs: std::collections::HashSet<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        assert_eq!(ours, theirs);
        let to_byte = byte_level_bytes();
        assert_eq!(to_byte('Ġ'), Some(b' '));
        assert_eq!(to_byte('Ċ'), Some(b'\n'));
        assert_eq!(to_byte('a'), Some(b'a'));
        assert_eq!(to_byte('€'), None);
    }
}
