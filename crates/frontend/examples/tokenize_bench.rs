//! Time the frontend spends tokenizing one prompt of about 1,000 tokens, the per-request cost that grows with the
//! prompt (routing and streaming are measured end to end with `cleave bench`, docs/benchmarks.md).
//!
//! `cargo run --release -p cleave-frontend --example tokenize_bench -- TOKENIZER_JSON [ITERATIONS]`; a realistic
//! tokenizer: `python3 tools/train_bench_tokenizer.py DIR` (byte-level BPE, Llama 3's split, 128k vocabulary).

use std::time::Instant;

use cleave_engine::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: tokenize_bench TOKENIZER_JSON [ITERATIONS]")?;
    let iterations: usize = args.next().map_or(Ok(2000), |n| n.parse())?;
    let tokenizer = Tokenizer::from_file(path.as_ref())?;
    // English prose with numbers and punctuation, grown until it is about 1,000 tokens.
    let sentence = "The quick brown fox, 42 years old, jumped over 7 lazy dogs near the river's edge; \
                    meanwhile, engineers measured latency in milliseconds (p99) across 1,000 requests. ";
    let mut text = String::new();
    while tokenizer.encode_with(&text, false)?.len() < 1000 {
        text.push_str(sentence);
    }
    let n_tokens = tokenizer.encode_with(&text, false)?.len();
    let mut micros: Vec<f64> = (0..iterations)
        .map(|_| {
            let started = Instant::now();
            let ids = tokenizer.encode_with(&text, false).expect("encodes");
            std::hint::black_box(ids);
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    println!(
        "{{\"prompt_tokens\": {n_tokens}, \"prompt_bytes\": {}, \"iterations\": {iterations}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"max_us\": {:.1}}}",
        text.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
