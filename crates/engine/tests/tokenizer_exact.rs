//! The byte-level BPE encoder gives exactly the ids `tokenizers` gives: token for token, with and without special
//! tokens, on the fixtures' tokenizers and on tokenizers trained with Llama 3's, Qwen2's and GPT-2's splits
//! (tests/fixtures/tokenizers, made by tools/train_bench_tokenizer.py), over Python's standard library and seeded
//! random text built to hit every branch of the splits (all scripts, combining marks, emoji, CJK, mixed line endings,
//! runs of spaces, tabs and digits, contractions in every case, added-token strings whole and cut short).
//!
//! More files (a 128k-vocabulary bench tokenizer, real Llama 3 or Qwen files from `tools/fetch_real_tokenizers.sh`)
//! are checked when `CLEAVE_EXTRA_TOKENIZERS` lists them, separated by `:`.

use std::path::{Path, PathBuf};

use cleave_engine::tokenizer::Tokenizer;
use tokenizers::AddedToken;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(relative)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// SplitMix64: a fixed-seed generator, so every run checks the same strings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const SPACES: &[&str] = &[
    " ", " ", " ", "\t", "\n", "\n", "\r\n", "\r", "\u{a0}", "\u{3000}", "\u{2028}", "\u{85}", "\u{b}", "\u{c}",
    "\u{2009}", "\u{180e}", "\u{200b}", "\u{feff}",
];
const CONTRACTIONS: &[&str] = &[
    "'s",
    "'S",
    "'t",
    "'T",
    "'re",
    "'RE",
    "'rE",
    "'ve",
    "'Ve",
    "'m",
    "'M",
    "'ll",
    "'LL",
    "'lL",
    "'d",
    "'D",
    "’s",
    "'ſ",
    "'K",
    "'",
    "''",
    "'r",
    "'l",
    "'v",
    "'sa",
    "'tis",
    " 's",
    "\u{2019}ll",
];
const PUNCTUATION: &str = "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'";
/// Characters that exercise classes, NFC and the byte-level map: Latin-1, Greek, Cyrillic, Arabic, Hebrew,
/// Devanagari, Thai, CJK, kana, Hangul (syllables and jamo, which NFC composes), combining marks, digits of other
/// scripts, letter-like numbers, emoji with modifiers and joiners, variation selectors, the Angstrom and Kelvin
/// signs, soft hyphen, private use, replacement character.
const SCRIPTS: &[&str] = &[
    "é",
    "ß",
    "ÿ",
    "Å",
    "\u{212b}",
    "\u{212a}",
    "\u{2126}",
    "λ",
    "Ω",
    "ж",
    "Я",
    "ع",
    "ش",
    "\u{64b}",
    "ש",
    "ह",
    "\u{94d}",
    "क्ष",
    "ก",
    "\u{e31}",
    "中",
    "文",
    "字",
    "の",
    "カ",
    "한",
    "국",
    "\u{1100}",
    "\u{1161}",
    "\u{11a8}",
    "e\u{301}",
    "\u{301}",
    "\u{308}",
    "\u{20dd}",
    "٣",
    "１",
    "²",
    "Ⅻ",
    "½",
    "𝟘",
    "😀",
    "👍🏽",
    "👨\u{200d}👩\u{200d}👧",
    "🇫🇷",
    "❤\u{fe0f}",
    "\u{fe0f}",
    "\u{ad}",
    "\u{e000}",
    "\u{fffd}",
    "𐍈",
    "𝔘",
    "\u{1f3fb}",
    "ǅ",
    "ʰ",
    "〇",
    "々",
];

/// A random text of up to `atoms_max` pieces of the kinds above, plus `specials` (added tokens) whole and cut short.
fn random_text(rng: &mut Rng, atoms_max: usize, specials: &[String]) -> String {
    let mut text = String::new();
    for _ in 0..rng.below(atoms_max + 1) {
        match rng.below(12) {
            0 | 1 => {
                let upper = rng.below(4) == 0;
                for _ in 0..1 + rng.below(10) {
                    let c = (b'a' + rng.below(26) as u8) as char;
                    text.push(if upper && rng.below(2) == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    });
                }
            }
            2 => {
                for _ in 0..1 + rng.below(6) {
                    text.push_str(rng.pick(SPACES));
                }
            }
            3 => text.push_str(&" ".repeat(1 + rng.below(6))),
            4 => {
                for _ in 0..1 + rng.below(9) {
                    text.push((b'0' + rng.below(10) as u8) as char);
                }
            }
            5 => text.push_str(rng.pick(CONTRACTIONS)),
            6 => {
                for _ in 0..1 + rng.below(4) {
                    text.push(PUNCTUATION.as_bytes()[rng.below(PUNCTUATION.len())] as char);
                }
            }
            7 | 8 => {
                for _ in 0..1 + rng.below(4) {
                    text.push_str(rng.pick(SCRIPTS));
                }
            }
            9 => {
                // Any code point at all, mostly unassigned or rare.
                let c = loop {
                    if let Some(c) = char::from_u32(rng.below(0x11_0000) as u32) {
                        break c;
                    }
                };
                text.push(c);
            }
            10 => {
                // Any code point of the first 64k: the BMP's scripts, symbols and marks.
                let c = loop {
                    if let Some(c) = char::from_u32(rng.below(0x1_0000) as u32) {
                        break c;
                    }
                };
                text.push(c);
            }
            _ if !specials.is_empty() => {
                let special = &specials[rng.below(specials.len())];
                let cut = if rng.below(3) == 0 {
                    rng.below(special.len())
                } else {
                    special.len()
                };
                let cut = (0..=cut).rev().find(|&i| special.is_char_boundary(i)).unwrap_or(0);
                text.push_str(&special[..cut]);
            }
            _ => text.push(' '),
        }
    }
    text
}

/// Hand-picked texts for each branch of the splits.
fn adversarial_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "",
        " ",
        "  ",
        "\n",
        "\r\n",
        "\n\n\n",
        " \n \n ",
        "a",
        "Hello, world!",
        "Hello world's best 'LL cafe's ’s don't I'M we'Re you'VE ſ'ſ 'ſ",
        "   leading and trailing   ",
        "tabs\t\tand\t \tspaces \t",
        "line\r\nendings\rmixed\n\r\n\r\r\n",
        "numbers 1 12 123 1234 12345 1,000,000 3.14159 ١٢٣٤ １２３４ ²³ Ⅻ ½",
        "x=1;y=22;z=333;\n\tif (a&&b) { return c; }\n",
        "    def f(self):\n        return 'x'  \n\n\n    # comment\n",
        "!!!???...,,,;;;:::\n\n",
        " !!! \n",
        "'''quoted''' \"\"\"doc\"\"\"",
        "e\u{301}te\u{301} Åström \u{212b} \u{1100}\u{1161}\u{11a8}",
        "中文字符测试，还有标点。日本語のテキスト。한국어 텍스트.",
        "emoji 😀👍🏽👨\u{200d}👩\u{200d}👧 🇫🇷 ❤\u{fe0f}",
        "\u{a0}\u{a0}x\u{3000}y\u{2028}z\u{85}",
        "\u{feff}BOM and \u{200b}zero\u{200b}width",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.push(" ".repeat(300));
    texts.push("\n".repeat(40) + "x");
    texts.push("9".repeat(100));
    texts.push("ab".repeat(500));
    texts.push("a".repeat(2000));
    texts.push("🚀".repeat(50));
    texts
}

/// Python's standard library sources: every `part`-th of `parts` files, in path order. Empty, with a note, when
/// there is no `python3`.
fn python_stdlib(part: usize, parts: usize) -> Vec<String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output();
    let Some(dir) = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    else {
        eprintln!("note: no python3, so no standard library sources in the corpus");
        return Vec::new();
    };
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::from(dir)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.file_name().is_some_and(|n| n == "site-packages") {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "py") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .iter()
        .skip(part)
        .step_by(parts)
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

struct Checked {
    texts: usize,
    bytes: usize,
    tokens: usize,
}

/// Encodes every text with both and reports the first few differences in full.
fn assert_same_ids(name: &str, json: &str, texts: &[String]) -> Checked {
    let ours = Tokenizer::from_json(json).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        ours.encodes_fast(),
        "{name}: the byte-level BPE encoder declined this tokenizer"
    );
    let theirs: tokenizers::Tokenizer = json.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut differences = Vec::new();
    let mut checked = Checked {
        texts: 0,
        bytes: 0,
        tokens: 0,
    };
    for text in texts {
        for add_special_tokens in [false, true] {
            let encoding = theirs.encode(text.as_str(), add_special_tokens).unwrap();
            let expected = encoding.get_ids();
            let got = ours.encode_with(text, add_special_tokens).unwrap();
            if got != expected && differences.len() < 5 {
                let at = got.iter().zip(expected).take_while(|(a, b)| a == b).count();
                // The text around the first token that differs, by tokenizers' offsets.
                let offset = encoding.get_offsets().get(at).map_or(text.len(), |o| o.0);
                let window_start = (0..=offset.saturating_sub(60))
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap();
                let window_end = (offset + 60..=text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                differences.push(format!(
                    "text of {} bytes (special tokens: {add_special_tokens}): first difference at token {at}, byte \
                     {offset}, in {:?}: ours {:?}, tokenizers {:?}",
                    text.len(),
                    &text[window_start..window_end],
                    &got[at.saturating_sub(3)..(at + 5).min(got.len())],
                    &expected[at.saturating_sub(3)..(at + 5).min(expected.len())],
                ));
            }
            checked.tokens += expected.len();
        }
        checked.texts += 1;
        checked.bytes += text.len();
    }
    assert!(
        differences.is_empty(),
        "{name}: ids differ from tokenizers':\n{}",
        differences.join("\n")
    );
    eprintln!(
        "{name}: {} texts, {} bytes, {} tokens: identical",
        checked.texts, checked.bytes, checked.tokens
    );
    checked
}

/// The corpus for one tokenizer: hand-picked texts, a quarter of the standard library, and `n_random` seeded random
/// texts using its added tokens.
fn corpus(json: &str, seed: u64, n_random: usize) -> Vec<String> {
    let theirs: tokenizers::Tokenizer = json.parse().unwrap();
    let specials: Vec<String> = theirs
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let mut texts = adversarial_texts();
    for special in &specials {
        texts.push(format!(
            "{special}Hello{special} {special}\n{special}{special}  {special}"
        ));
    }
    texts.extend(python_stdlib(seed as usize % 4, 4));
    let mut rng = Rng(seed);
    texts.extend((0..n_random).map(|i| random_text(&mut rng, if i % 10 == 0 { 400 } else { 40 }, &specials)));
    texts
}

/// `json` with `ignore_merges` set as given: Llama 3's files set it, the trained ones do not.
fn with_ignore_merges(json: &str, ignore_merges: bool) -> String {
    let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
    value["model"]["ignore_merges"] = ignore_merges.into();
    value.to_string()
}

/// `json` with more added tokens: special and not, normalized and not, overlapping each other and the text.
fn with_added_tokens(json: &str) -> String {
    let mut tokenizer: tokenizers::Tokenizer = json.parse().unwrap();
    tokenizer
        .add_special_tokens([
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
            AddedToken::from("<|im", true),
            AddedToken::from("<tool_call>", true),
        ])
        .unwrap();
    tokenizer
        .add_tokens([
            AddedToken::from("</tool_call>", false).normalized(false),
            AddedToken::from("hello world", false).normalized(true),
            AddedToken::from("start|>", false).normalized(true),
            AddedToken::from("Å", false).normalized(true),
            AddedToken::from("def ", false).normalized(true),
        ])
        .unwrap();
    tokenizer.to_string(false).unwrap()
}

const N_RANDOM: usize = 20_000;

#[test]
fn gpt2_split_fixture_tokenizer_matches_tokenizers() {
    let json = fixture("tests/fixtures/hf/llama/tokenizer.json");
    assert_same_ids(
        "fixtures/hf/llama (GPT-2 split, 397 tokens)",
        &json,
        &corpus(&json, 1, N_RANDOM),
    );
}

#[test]
fn gpt2_split_trained_tokenizer_matches_tokenizers() {
    let json = fixture("tests/fixtures/tokenizers/gpt2-split-6k.json");
    assert_same_ids("gpt2-split-6k", &json, &corpus(&json, 2, N_RANDOM));
}

#[test]
fn llama3_split_trained_tokenizer_matches_tokenizers_with_and_without_ignore_merges() {
    let json = fixture("tests/fixtures/tokenizers/llama3-split-6k.json");
    assert_same_ids("llama3-split-6k", &json, &corpus(&json, 3, N_RANDOM));
    let json = with_ignore_merges(&json, true);
    assert_same_ids("llama3-split-6k, ignore_merges", &json, &corpus(&json, 7, N_RANDOM));
}

#[test]
fn qwen2_split_trained_tokenizer_with_nfc_matches_tokenizers() {
    let json = fixture("tests/fixtures/tokenizers/qwen2-split-6k.json");
    assert_same_ids("qwen2-split-6k", &json, &corpus(&json, 4, N_RANDOM));
}

#[test]
fn added_tokens_are_split_out_as_tokenizers_does() {
    for (i, name) in ["qwen2-split-6k", "llama3-split-6k"].into_iter().enumerate() {
        let json = with_added_tokens(&fixture(&format!("tests/fixtures/tokenizers/{name}.json")));
        let mut rng = Rng(100 + i as u64);
        let specials: Vec<String> = [
            "<|im_start|>",
            "<|im_end|>",
            "<|im",
            "<tool_call>",
            "</tool_call>",
            "hello world",
        ]
        .iter()
        .chain(&["start|>", "Å", "\u{212b}", "def ", "<|endoftext|>", "<|begin_of_text|>"])
        .map(|s| s.to_string())
        .collect();
        let texts: Vec<String> = (0..N_RANDOM / 2)
            .map(|_| random_text(&mut rng, 30, &specials))
            .collect();
        assert_same_ids(&format!("{name} with more added tokens"), &json, &texts);
    }
}

#[test]
fn bos_comes_from_the_post_processor_only_with_special_tokens() {
    let tokenizer = Tokenizer::from_json(&fixture("tests/fixtures/tokenizers/llama3-split-6k.json")).unwrap();
    assert!(tokenizer.encodes_fast());
    let with = tokenizer.encode_with("Hello", true).unwrap();
    let without = tokenizer.encode_with("Hello", false).unwrap();
    assert_eq!(with[0], 0, "<|begin_of_text|> is id 0 in this file");
    assert_eq!(with[1..], without[..]);
    assert_eq!(tokenizer.encode_with("", true).unwrap(), [0]);
}

#[test]
fn extra_tokenizers_match_tokenizers_when_given() {
    let Ok(paths) = std::env::var("CLEAVE_EXTRA_TOKENIZERS") else {
        eprintln!(
            "skipped: CLEAVE_EXTRA_TOKENIZERS is not set (':'-separated tokenizer.json paths: the 128k bench tokenizer \
             of tools/train_bench_tokenizer.py, real ones from tools/fetch_real_tokenizers.sh)"
        );
        return;
    };
    for (i, path) in paths.split(':').filter(|p| !p.is_empty()).enumerate() {
        let json = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_same_ids(path, &json, &corpus(&json, 10 + i as u64, N_RANDOM));
    }
}

/// Files the byte-level BPE encoder must decline (they still encode, through `tokenizers`).
#[test]
fn tokenizers_it_does_not_reproduce_fall_back_to_tokenizers() {
    let base: serde_json::Value =
        serde_json::from_str(&fixture("tests/fixtures/tokenizers/llama3-split-6k.json")).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 7] = [
        ("a lowercase normalizer", |v| {
            v["normalizer"] = serde_json::json!({"type": "Lowercase"})
        }),
        ("another split pattern", |v| {
            v["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+".into()
        }),
        ("an inverted split", |v| {
            v["pre_tokenizer"]["pretokenizers"][0]["invert"] = true.into()
        }),
        ("add_prefix_space", |v| {
            v["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true.into()
        }),
        ("BPE dropout", |v| v["model"]["dropout"] = 0.5.into()),
        ("an lstrip added token", |v| {
            v["added_tokens"][0]["lstrip"] = true.into()
        }),
        (
            "truncation",
            |v| {
                v["truncation"] =
                    serde_json::json!({"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0})
            },
        ),
    ];
    let text = "Hello World's <|begin_of_text|> 12345 tokens\n\n  end";
    for (what, edit) in edits {
        let mut json = base.clone();
        edit(&mut json);
        let json = json.to_string();
        let ours = Tokenizer::from_json(&json).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!ours.encodes_fast(), "{what}: should fall back to tokenizers");
        let theirs: tokenizers::Tokenizer = json.parse().unwrap();
        if what != "BPE dropout" {
            let expected = theirs.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(ours.encode_with(text, true).unwrap(), expected, "{what}");
        }
    }
}

#[test]
fn bad_tokenizer_files_are_errors_not_panics() {
    let base = fixture("tests/fixtures/tokenizers/llama3-split-6k.json");
    let mut missing_merge: serde_json::Value = serde_json::from_str(&base).unwrap();
    missing_merge["model"]["merges"][0] = serde_json::json!(["no-such-token", "x"]);
    for (what, json) in [
        ("empty", String::new()),
        ("not JSON", "{\"model\": ".to_string()),
        ("cut short", base[..base.len() / 2].to_string()),
        ("a merge of tokens not in the vocabulary", missing_merge.to_string()),
    ] {
        assert!(Tokenizer::from_json(&json).is_err(), "{what} loaded");
    }
    let err = match Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing file loaded"),
    };
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
}
