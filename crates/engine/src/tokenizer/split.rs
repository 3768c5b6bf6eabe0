//! The pre-tokenizer splits of byte-level BPE tokenizers, as hand-written scanners.
//!
//! `tokenizers` runs these patterns through fancy-regex, a backtracking engine (they end in `\s+(?!\S)`, a lookahead
//! that `regex`/`regex-automata` cannot express), and that is most of its encoding time. Each pattern below is a
//! leftmost-first alternation that matches at every position, so its matches tile the text and the match starting at
//! a position depends only on a few characters' classes: a scanner that decides each alternative in order, with the
//! backtracking worked out by hand (comments at each alternative), gives the same pieces in one forward pass.
//! Character classes come from `regex-syntax`, the tables the regex engines behind `tokenizers` use, so both agree on
//! every code point. `tests/tokenizer_exact.rs` checks the pieces against `tokenizers` on large random corpora.

use std::sync::LazyLock;

use regex_syntax::hir::{Class, HirKind};

/// Which split a tokenizer uses; [`SplitPattern::from_regex`] recognises Split pre-tokenizers by their exact source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SplitPattern {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`: GPT-2's, which `tokenizers`'
    /// ByteLevel pre-tokenizer applies when `use_regex` is true.
    Gpt2,
    /// Llama 3's [`LLAMA3`].
    Llama3,
    /// Qwen2's [`QWEN2`]: Llama 3's with one digit per piece.
    Qwen2,
}

pub(super) const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl SplitPattern {
    pub(super) fn from_regex(pattern: &str) -> Option<Self> {
        match pattern {
            LLAMA3 => Some(Self::Llama3),
            QWEN2 => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// Calls `piece` with each piece of `text`, in order; the pieces concatenate to `text`.
    pub(super) fn for_each_piece<'t>(self, text: &'t str, mut piece: impl FnMut(&'t str)) {
        let classes = &*CLASSES;
        let bytes = text.as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let end = match self {
                Self::Gpt2 => classes.gpt2_end(bytes, start),
                Self::Llama3 => classes.llama3_end(bytes, start, 3),
                Self::Qwen2 => classes.llama3_end(bytes, start, 1),
            };
            debug_assert!(end > start && text.is_char_boundary(end));
            piece(&text[start..end]);
            start = end;
        }
    }
}

/// Character classes. A code point is in exactly one: `\p{L}`, `\p{N}`, `\s` (split into `\r`/`\n` and the rest) or
/// none of them.
const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;
const NEWLINE: u8 = 4;

/// The first 64k code points by table (one byte each), the rest by binary search over ranges.
struct Classes {
    bmp: Box<[u8]>,
    /// `(first, last, class)` for code points past U+FFFF that are not [`OTHER`], sorted.
    astral: Vec<(u32, u32, u8)>,
    /// Letters that `(?i)` makes equal to `s t r e v m l d`, for Llama 3's case-insensitive contractions (`ſ` is an
    /// `s` there).
    fold: [Vec<char>; 8],
}

static CLASSES: LazyLock<Classes> = LazyLock::new(Classes::new);

/// The code points of a one-character class expression, from `regex-syntax` with Unicode on.
fn class_ranges(expr: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(expr).expect("a valid class expression");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(lit) => {
            let c = std::str::from_utf8(&lit.0)
                .expect("UTF-8")
                .chars()
                .next()
                .expect("one character");
            vec![(c as u32, c as u32)]
        }
        other => panic!("{expr} parsed to {other:?}, not a class"),
    }
}

impl Classes {
    fn new() -> Self {
        let mut bmp = vec![OTHER; 0x10000].into_boxed_slice();
        let mut astral = Vec::new();
        for (expr, class) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (first, last) in class_ranges(expr) {
                for cp in first..=last.min(0xFFFF) {
                    assert_eq!(bmp[cp as usize], OTHER, "U+{cp:04X} in two classes");
                    bmp[cp as usize] = class;
                }
                if last > 0xFFFF {
                    astral.push((first.max(0x10000), last, class));
                }
            }
        }
        bmp[usize::from(b'\r')] = NEWLINE;
        bmp[usize::from(b'\n')] = NEWLINE;
        astral.sort_unstable();
        let fold = ["s", "t", "r", "e", "v", "m", "l", "d"].map(|letter| {
            class_ranges(&format!("(?i){letter}"))
                .into_iter()
                .flat_map(|(first, last)| (first..=last).filter_map(char::from_u32))
                .collect()
        });
        Self { bmp, astral, fold }
    }

    /// Class and UTF-8 length of the character at `at`, a character boundary of valid UTF-8.
    #[inline]
    fn at(&self, s: &[u8], at: usize) -> (u8, usize) {
        let b0 = s[at];
        if b0 < 0x80 {
            return (self.bmp[usize::from(b0)], 1);
        }
        let (cp, len) = decode(s, at);
        (self.of(cp), len)
    }

    #[inline]
    fn of(&self, cp: u32) -> u8 {
        if cp <= 0xFFFF {
            return self.bmp[cp as usize];
        }
        match self.astral.binary_search_by(|&(first, last, _)| {
            if last < cp {
                std::cmp::Ordering::Less
            } else if first > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => self.astral[i].2,
            Err(_) => OTHER,
        }
    }

    /// End of the run of `class` characters starting at `at`.
    #[inline]
    fn run_end(&self, s: &[u8], mut at: usize, class: u8) -> usize {
        while at < s.len() {
            let (c, len) = self.at(s, at);
            if c != class {
                break;
            }
            at += len;
        }
        at
    }

    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    fn gpt2_end(&self, s: &[u8], p: usize) -> usize {
        if s[p] == b'\'' {
            // Case-sensitive contractions; their first letters differ, so at most one matches.
            let rest = &s[p + 1..];
            for contraction in [&b"s"[..], b"t", b"re", b"ve", b"m", b"ll", b"d"] {
                if rest.starts_with(contraction) {
                    return p + 1 + contraction.len();
                }
            }
        }
        let (class, len) = self.at(s, p);
        match class {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` without the space.
            LETTER | NUMBER | OTHER => return self.run_end(s, p + len, class),
            _ => {}
        }
        if s[p] == b' ' && p + 1 < s.len() {
            // The same three with the space: the class of the character after it picks the alternative.
            let (next, next_len) = self.at(s, p + 1);
            if matches!(next, LETTER | NUMBER | OTHER) {
                return self.run_end(s, p + 1 + next_len, next);
            }
        }
        self.whitespace_end(s, p, false)
    }

    /// Llama 3 (`digits_max` 3) and Qwen2 (1): `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    fn llama3_end(&self, s: &[u8], p: usize, digits_max: usize) -> usize {
        if s[p] == b'\''
            && let Some(len) = self.contraction_len_ci(&s[p + 1..])
        {
            return p + 1 + len;
        }
        let (class, len) = self.at(s, p);
        // `[^\r\n\p{L}\p{N}]?\p{L}+`: a letter run, or any one character but a newline or digit, then a letter run.
        if class == LETTER {
            return self.run_end(s, p + len, LETTER);
        }
        if class != NUMBER && class != NEWLINE && p + len < s.len() {
            let (next, next_len) = self.at(s, p + len);
            if next == LETTER {
                return self.run_end(s, p + len + next_len, LETTER);
            }
        }
        // `\p{N}{1,3}`
        if class == NUMBER {
            let mut end = p + len;
            for _ in 1..digits_max {
                if end == s.len() {
                    break;
                }
                let (next, next_len) = self.at(s, end);
                if next != NUMBER {
                    break;
                }
                end += next_len;
            }
            return end;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        if class == OTHER {
            return newlines_end(s, self.run_end(s, p + len, OTHER));
        }
        if s[p] == b' ' && p + 1 < s.len() {
            let (next, next_len) = self.at(s, p + 1);
            if next == OTHER {
                return newlines_end(s, self.run_end(s, p + 1 + next_len, OTHER));
            }
        }
        self.whitespace_end(s, p, true)
    }

    /// The whitespace alternatives at `p`, a whitespace character no earlier alternative matched. Over the maximal
    /// whitespace run `[p, e)`:
    /// - `\s*[\r\n]+` (Llama 3 only, `newline_alternative`): `\s*` gives back characters until `[\r\n]+` matches, so
    ///   the match ends just after the run's last `\r` or `\n`, if it has one;
    /// - `\s+(?!\S)`: the whole run at the end of the text; otherwise `\s+` gives back its last character (then
    ///   followed by whitespace), which needs a run of two or more;
    /// - `\s+`: the whole run (one character followed by a non-space).
    fn whitespace_end(&self, s: &[u8], p: usize, newline_alternative: bool) -> usize {
        let mut end = p;
        let mut last_start = p;
        let mut n_chars = 0usize;
        let mut after_newline = None;
        while end < s.len() {
            let (class, len) = self.at(s, end);
            if class != SPACE && class != NEWLINE {
                break;
            }
            if class == NEWLINE {
                after_newline = Some(end + len);
            }
            last_start = end;
            end += len;
            n_chars += 1;
        }
        debug_assert!(n_chars > 0, "whitespace_end at a non-space");
        if newline_alternative && let Some(after) = after_newline {
            return after;
        }
        if end == s.len() || n_chars == 1 {
            end
        } else {
            last_start
        }
    }

    /// Length of `s|t|re|ve|m|ll|d` at the start of `rest`, case-insensitive as `(?i)` is (Unicode simple case
    /// folding), or `None`.
    fn contraction_len_ci(&self, rest: &[u8]) -> Option<usize> {
        // Indices into `fold`.
        const S: usize = 0;
        const T: usize = 1;
        const R: usize = 2;
        const E: usize = 3;
        const V: usize = 4;
        const M: usize = 5;
        const L: usize = 6;
        const D: usize = 7;
        let is = |c: char, letter: usize| self.fold[letter].contains(&c);
        let (first, first_len) = char_at(rest, 0)?;
        if is(first, S) || is(first, T) || is(first, M) || is(first, D) {
            return Some(first_len);
        }
        let second = if is(first, R) || is(first, V) {
            E
        } else if is(first, L) {
            L
        } else {
            return None;
        };
        let (next, next_len) = char_at(rest, first_len)?;
        is(next, second).then_some(first_len + next_len)
    }
}

/// The character at `at` (a boundary of valid UTF-8) and its length, or `None` at the end.
fn char_at(s: &[u8], at: usize) -> Option<(char, usize)> {
    let b0 = *s.get(at)?;
    let (cp, len) = if b0 < 0x80 { (u32::from(b0), 1) } else { decode(s, at) };
    Some((char::from_u32(cp)?, len))
}

/// End of the `[\r\n]*` run at `at`.
fn newlines_end(s: &[u8], mut at: usize) -> usize {
    while at < s.len() && matches!(s[at], b'\r' | b'\n') {
        at += 1;
    }
    at
}

/// The code point and length of the multi-byte UTF-8 character at `at` (valid UTF-8, at a boundary).
#[inline]
fn decode(s: &[u8], at: usize) -> (u32, usize) {
    let b0 = u32::from(s[at]);
    let cont = |i: usize| u32::from(s[at + i] & 0x3F);
    if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | cont(1), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | (cont(1) << 6) | cont(2), 3)
    } else {
        (((b0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3), 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pattern: SplitPattern, text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        pattern.for_each_piece(text, |p| out.push(p));
        out
    }

    #[test]
    fn classes_agree_with_std_where_std_defines_the_same_property() {
        // `char::is_whitespace` is White_Space and `char::is_numeric` is N: a cross-check of the table building (the
        // two may differ only where std and regex-syntax were built from different Unicode versions).
        let classes = &*CLASSES;
        let mut disagreements = 0;
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            let class = classes.of(c as u32);
            disagreements += usize::from(c.is_whitespace() != matches!(class, SPACE | NEWLINE));
            disagreements += usize::from(c.is_numeric() != (class == NUMBER));
        }
        assert!(disagreements < 64, "{disagreements} code points disagree");
        assert_eq!(classes.of('ſ' as u32), LETTER);
        assert!(classes.fold[0].contains(&'ſ') && classes.fold[0].contains(&'S'));
    }

    #[test]
    fn whitespace_before_a_word_goes_with_the_word_and_trailing_runs_stay_whole() {
        assert_eq!(pieces(SplitPattern::Gpt2, "a   b  "), ["a", "  ", " b", "  "]);
        assert_eq!(
            pieces(SplitPattern::Llama3, "a \n\n  b\t!"),
            ["a", " \n\n", " ", " b", "\t", "!"]
        );
        assert_eq!(
            pieces(SplitPattern::Llama3, "it'S ſ'ſ 12345"),
            ["it", "'S", " ſ", "'ſ", " ", "123", "45"]
        );
        assert_eq!(pieces(SplitPattern::Qwen2, "x=12;\r\n"), ["x", "=", "1", "2", ";\r\n"]);
    }
}
