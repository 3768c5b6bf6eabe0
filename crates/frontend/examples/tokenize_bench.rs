//! Time the frontend spends tokenizing one prompt of about 1,000 tokens, the per-request cost that grows with the
//! prompt (routing and streaming are measured end to end with `cleave bench`, docs/benchmarks.md).
//!
//! `cargo run --release -p cleave-frontend --example tokenize_bench -- TOKENIZER_JSON [ITERATIONS]`; a realistic
//! tokenizer: `python3 tools/train_bench_tokenizer.py DIR` (byte-level BPE, Llama 3's split, 128k vocabulary).
//!
//! Three prompts (English prose, Python source, mixed scripts), each timed with the encoder the frontend uses
//! (`encoder: "cleave"`: the byte-level BPE encoder where the file allows it) and with the `tokenizers` crate
//! (`encoder: "tokenizers"`), alternating, after checking that both give the same ids. One JSON line per prompt and
//! encoder.

use std::time::Instant;

use cleave_engine::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: tokenize_bench TOKENIZER_JSON [ITERATIONS]")?;
    let iterations: usize = args.next().map_or(Ok(2000), |n| n.parse())?;
    let tokenizer = Tokenizer::from_file(path.as_ref())?;
    let prompts = [
        // English prose with numbers and punctuation.
        (
            "english",
            "The quick brown fox, 42 years old, jumped over 7 lazy dogs near the river's edge; meanwhile, engineers \
             measured latency in milliseconds (p99) across 1,000 requests. ",
        ),
        (
            "code",
            "    def tokenize(self, text: str) -> list[int]:\n        \"\"\"Split `text` into ids.\"\"\"\n        \
             ids = [self.bos_id] if self.add_bos else []\n        for word in re.findall(r\"\\w+|\\S\", text):\n\
             \x20           ids.extend(self.vocab.get(word, [self.unk_id]))\n        return ids  # 2-3 ms?\n\n",
        ),
        (
            "multilingual",
            "Der Preis beträgt 12,50 € — très cher ! Москва 2024 год. 東京は晴れ、気温は３２度です。北京欢迎你。\
             서울의 인구는 약 940만 명이다. مرحبا بالعالم 🚀🔥 ",
        ),
    ];
    for (name, unit) in prompts {
        // The unit repeated until the prompt is about 1,000 tokens.
        let mut text = String::new();
        while tokenizer.encode_with(&text, false)?.len() < 1000 {
            text.push_str(unit);
        }
        let ids = tokenizer.encode_with(&text, false)?;
        if ids != tokenizer.encode_with_tokenizers_crate(&text, false)? {
            return Err(format!("{name}: the encoders disagree").into());
        }
        let mut micros = [Vec::with_capacity(iterations), Vec::with_capacity(iterations)];
        for _ in 0..iterations {
            let started = Instant::now();
            std::hint::black_box(tokenizer.encode_with(&text, false)?);
            micros[0].push(started.elapsed().as_secs_f64() * 1e6);
            let started = Instant::now();
            std::hint::black_box(tokenizer.encode_with_tokenizers_crate(&text, false)?);
            micros[1].push(started.elapsed().as_secs_f64() * 1e6);
        }
        for (encoder, mut micros) in ["cleave", "tokenizers"].into_iter().zip(micros) {
            micros.sort_by(f64::total_cmp);
            let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
            println!(
                "{{\"prompt\": \"{name}\", \"encoder\": \"{encoder}\", \"fast_encoder_loaded\": {}, \
                 \"prompt_tokens\": {}, \"prompt_bytes\": {}, \"iterations\": {iterations}, \"p50_us\": {:.1}, \
                 \"p99_us\": {:.1}, \"max_us\": {:.1}, \"ids_identical\": true}}",
                tokenizer.encodes_fast(),
                ids.len(),
                text.len(),
                at(0.5),
                at(0.99),
                at(1.0)
            );
        }
    }
    Ok(())
}
