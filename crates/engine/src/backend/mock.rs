//! The mock backend: everything of the engine but the math. Tensors carry a shape and one 32-bit state per row
//! instead of numbers, weights carry only a shape (no value is generated or read, so a Llama-3-70B-shaped model builds
//! in a millisecond), and the KV cache holds one state per slot and layer. The scheduler, block pool, prefix cache,
//! sampler, detokenizer, stop strings, workers and KV transfer above it run unchanged. Each step costs the time a
//! [`MockTiming`] says, spent sleeping, so routers and planners can be tested against many workers on one machine.
//!
//! # What the mock model computes
//! A row's state is a hash chain, written once per layer, shaped like attention: at layer `l` the token at position
//! `p` gets `s(l, p) = mix(s(l, p - 1), s(l - 1, p))`, where `s(-1, p)` is the token id and `s(l, p - 1)` is read
//! back from the KV cache through the sequence's block table. The logits of a row put a high value on four tokens
//! drawn from its last-layer state (the first one highest) and a very low one everywhere else. So a sequence's tokens
//! are a deterministic function of its whole prefix, the same whether it ran alone or batched, chunked or whole,
//! from the prefix cache or recomputed after preemption — and, like a real model's, they come out wrong if any block
//! of any layer is missing or misplaced, which is what makes the mock useful to test KV transfer and caching.
//!
//! # Timing
//! A step enqueues its [`MockTiming::step_cost`] on a simulated device clock, one layer's share at a time (when the
//! layer's KV is written), and the host waits for the clock where a real backend would wait for the device: reading
//! logits or tokens back and exporting a layer's KV blocks. So a prefill worker streams layer `l` at `(l + 1) / n_layers`
//! of the step, as on a GPU. A zero timing never touches the clock: steps run as fast as the host allows.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AttentionShape, Backend, KvLayout, StepBatch};
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::sampler::{SampleRow, sample_row};
use crate::weights::HostTensor;

/// Bytes per KV element the mock reports: bf16, as the CUDA backend stores bf16 checkpoints. The KV cache is then
/// sized (`--kv-cache-mib`) and transferred (`kv_chunk` frames) exactly as a GPU worker's would be.
pub const KV_ELEM_BYTES: usize = 2;

/// The longest a single step may take, whatever the timing: a spec that asks for more is capped here, so a typo in
/// a spec cannot park a worker for hours.
pub const STEP_COST_MAX: Duration = Duration::from_secs(60);

/// The logit of the row's most likely token; the next three candidates get 1, 2 and 3 less.
const LOGIT_TOP: f32 = 3.0;
/// Candidate tokens per row.
const N_CANDIDATES: usize = 4;
/// The logit of every other token: low enough that all of them together hold a negligible share of the probability
/// (`vocab · e^-33` is below 1e-8 for any vocabulary up to a million tokens).
const LOGIT_OTHER: f32 = -30.0;
/// `s(l, -1)`: the chain value before a sequence's first token.
const CHAIN_START: u32 = 0x9e37_79b9;

/// The cost model of one step: `base_ms + prefill_token_us × prefill tokens + decode_seq_us × decode sequences +
/// context_token_ns × context tokens`. A sequence with one new token in the step counts as decoding, any other as
/// prefilling its new tokens; context tokens are the KV tokens every sequence of the step attends over. All zero
/// (the default): as fast as the host allows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MockTiming {
    /// Fixed cost of a step (reading the weights once, launching kernels).
    pub base_ms: f64,
    /// Per new token of a prefilling sequence (compute-bound work).
    pub prefill_token_us: f64,
    /// Per decoding sequence.
    pub decode_seq_us: f64,
    /// Per token of KV attended over, summed over the step's sequences (long contexts).
    pub context_token_ns: f64,
}

impl MockTiming {
    /// The keys of the spec, in the order `Display` writes them.
    pub const KEYS: [&'static str; 4] = ["base_ms", "prefill_token_us", "decode_seq_us", "context_token_ns"];

    /// Parses `key=value` pairs separated by commas (`base_ms=5,prefill_token_us=40`); keys left out are zero, and
    /// an empty spec or `zero` is all zero. Every value must be a finite number ≥ 0.
    pub fn parse(spec: &str) -> std::result::Result<Self, String> {
        let mut timing = MockTiming::default();
        let spec = spec.trim();
        if spec.is_empty() || spec == "zero" {
            return Ok(timing);
        }
        for pair in spec.split(',') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("mock timing: expected KEY=VALUE, got {:?}", pair.trim()))?;
            let (key, value) = (key.trim(), value.trim());
            let number: f64 = value
                .parse()
                .map_err(|_| format!("mock timing: {key}={value:?} is not a number"))?;
            if !(number.is_finite() && number >= 0.0) {
                return Err(format!(
                    "mock timing: {key}={value} must be a finite number of at least 0"
                ));
            }
            let field = match key {
                "base_ms" => &mut timing.base_ms,
                "prefill_token_us" => &mut timing.prefill_token_us,
                "decode_seq_us" => &mut timing.decode_seq_us,
                "context_token_ns" => &mut timing.context_token_ns,
                other => {
                    return Err(format!(
                        "mock timing: unknown key {other:?} (keys: {})",
                        Self::KEYS.join(", ")
                    ));
                }
            };
            *field = number;
        }
        Ok(timing)
    }

    pub fn is_zero(&self) -> bool {
        *self == MockTiming::default()
    }

    /// What `step` costs on the simulated device, at most [`STEP_COST_MAX`].
    pub fn step_cost(&self, step: &StepBatch) -> Duration {
        if self.is_zero() {
            return Duration::ZERO;
        }
        let (mut prefill_tokens, mut decode_seqs, mut context_tokens) = (0u64, 0u64, 0u64);
        for seq in &step.seqs {
            match seq.q_len {
                1 => decode_seqs += 1,
                n => prefill_tokens += n as u64,
            }
            context_tokens += seq.context_len as u64;
        }
        let seconds = self.base_ms * 1e-3
            + self.prefill_token_us * 1e-6 * prefill_tokens as f64
            + self.decode_seq_us * 1e-6 * decode_seqs as f64
            + self.context_token_ns * 1e-9 * context_tokens as f64;
        Duration::try_from_secs_f64(seconds).map_or(STEP_COST_MAX, |d| d.min(STEP_COST_MAX))
    }
}

/// The spec [`MockTiming::parse`] reads back (what `cleave serve` passes to its workers).
impl fmt::Display for MockTiming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = [
            self.base_ms,
            self.prefill_token_us,
            self.decode_seq_us,
            self.context_token_ns,
        ];
        let pairs: Vec<String> = Self::KEYS
            .iter()
            .zip(values)
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        f.write_str(&pairs.join(","))
    }
}

/// A backend that simulates the timing of a step instead of computing it (see the module documentation).
#[derive(Debug, Default)]
pub struct MockBackend {
    timing: MockTiming,
    device: DeviceClock,
}

impl MockBackend {
    pub fn new(timing: MockTiming) -> Self {
        Self {
            timing,
            device: DeviceClock::default(),
        }
    }

    pub fn timing(&self) -> MockTiming {
        self.timing
    }
}

/// A `(rows, cols)` activation: its shape, and one state per row (see the module documentation). States are shared
/// between tensors (most operations pass their input's rows through unchanged), so an operation costs nothing
/// beyond what the mock model computes.
#[derive(Clone, Debug)]
pub struct MockTensor {
    pub rows: usize,
    pub cols: usize,
    pub states: Arc<[u32]>,
}

/// A weight's shape `(rows, cols)` (vectors have one row); the mock never holds values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MockWeight {
    pub rows: usize,
    pub cols: usize,
}

/// One state per KV slot and layer: 4 bytes per token per layer, where a bf16 cache of the same shape would hold
/// `4 × kv_dim` (a 1/1024 of it for Llama-3-8B).
pub struct MockKvCache {
    pub layout: KvLayout,
    /// `layers[l][slot]`: the chain value `s(l, p)` of the token whose KV sits in `slot`.
    pub layers: Vec<Vec<u32>>,
}

/// A step as the mock runs it: the step itself (positions, slots and block tables drive the chain) and its cost.
pub struct MockBatch {
    pub step: StepBatch,
    pub cost: Duration,
}

impl Backend for MockBackend {
    type Tensor = MockTensor;
    type Weight = MockWeight;
    type KvCache = MockKvCache;
    type Batch = MockBatch;

    fn name(&self) -> &'static str {
        "mock"
    }

    fn weight(&self, tensor: HostTensor) -> Result<MockWeight> {
        self.weight_without_values(&tensor.shape).ok_or_else(|| Error::Backend {
            backend: "mock",
            message: format!("weights must be 1-D or 2-D, got shape {:?}", tensor.shape),
        })
    }

    fn weight_without_values(&self, shape: &[usize]) -> Option<MockWeight> {
        match *shape {
            [n] => Some(MockWeight { rows: 1, cols: n }),
            [rows, cols] => Some(MockWeight { rows, cols }),
            _ => None,
        }
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<MockKvCache> {
        let slots = layout
            .n_blocks
            .checked_mul(layout.block_size)
            .ok_or_else(|| Error::Backend {
                backend: "mock",
                message: format!("a KV cache of {} blocks overflows", layout.n_blocks),
            })?;
        let mut layers = Vec::with_capacity(layout.n_layers);
        for _ in 0..layout.n_layers {
            let mut states = Vec::new();
            states.try_reserve_exact(slots).map_err(|_| Error::Backend {
                backend: "mock",
                message: format!(
                    "cannot allocate the mock KV cache's {} MiB of states; lower --kv-cache-mib",
                    (slots * 4 * layout.n_layers) >> 20
                ),
            })?;
            states.resize(slots, 0);
            layers.push(states);
        }
        Ok(MockKvCache {
            layout: *layout,
            layers,
        })
    }

    fn batch(&self, step: &StepBatch) -> Result<MockBatch> {
        Ok(MockBatch {
            step: step.clone(),
            cost: self.timing.step_cost(step),
        })
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<MockTensor> {
        Ok(MockTensor {
            rows,
            cols,
            states: vec![0; rows].into(),
        })
    }

    fn batch_tokens(&self, batch: &MockBatch) -> usize {
        batch.step.n_tokens()
    }

    fn batch_logit_rows(&self, batch: &MockBatch) -> usize {
        batch.step.logit_rows.len()
    }

    fn embed(&self, out: &mut MockTensor, _table: &MockWeight, batch: &MockBatch) {
        out.states = batch.step.token_ids.as_slice().into();
    }

    fn rms_norm(&self, out: &mut MockTensor, x: &MockTensor, _weight: &MockWeight, _eps: f32) {
        out.states = x.states.clone();
    }

    /// The residual stream takes the sublayer's output: it already mixes in the stream (attention's chain reads the
    /// layer's input), so nothing is lost by not adding.
    fn add_rms_norm(&self, x: &mut MockTensor, y: &MockTensor, _weight: &MockWeight, _eps: f32, out: &mut MockTensor) {
        x.states = y.states.clone();
        out.states = y.states.clone();
    }

    fn linear(&self, out: &mut MockTensor, x: &MockTensor, _w: &MockWeight, _bias: Option<&MockWeight>) {
        out.states = x.states.clone();
    }

    /// Writes layer `layer_idx` of the chain: each new token's state mixes the previous position's state of this
    /// layer (from the cache, or computed just before in this step) with the token's state from the layer below.
    fn qkv_rope_kv(
        &self,
        q: &mut MockTensor,
        qkv: &MockTensor,
        cache: &mut MockKvCache,
        layer_idx: usize,
        _rope: &Rope,
        _qk_norm: Option<(&MockWeight, &MockWeight, f32)>,
        _shape: AttentionShape,
        batch: &MockBatch,
    ) {
        let bs = cache.layout.block_size;
        let layer = &mut cache.layers[layer_idx];
        let mut states = qkv.states.to_vec();
        for seq in &batch.step.seqs {
            let first_pos = (seq.context_len - seq.q_len) as usize;
            let mut prev = match first_pos.checked_sub(1) {
                None => CHAIN_START,
                Some(p) => layer[seq.block_table[p / bs] as usize * bs + p % bs],
            };
            let rows = seq.q_start as usize..(seq.q_start + seq.q_len) as usize;
            for (row, &slot) in states[rows.clone()].iter_mut().zip(&batch.step.slots[rows]) {
                prev = mix(prev, *row);
                *row = prev;
                layer[slot as usize] = prev;
            }
        }
        q.states = states.into();
        if !batch.cost.is_zero() {
            self.device.enqueue(batch.cost / cache.layout.n_layers as u32);
        }
    }

    fn attention(
        &self,
        out: &mut MockTensor,
        q: &MockTensor,
        _cache: &MockKvCache,
        _layer_idx: usize,
        _shape: AttentionShape,
        _batch: &MockBatch,
    ) {
        out.states = q.states.clone();
    }

    fn silu_mul(&self, out: &mut MockTensor, gate_up: &MockTensor) {
        out.states = gate_up.states.clone();
    }

    fn gather_logit_rows(&self, out: &mut MockTensor, x: &MockTensor, batch: &MockBatch) {
        out.states = batch.step.logit_rows.iter().map(|&r| x.states[r as usize]).collect();
    }

    /// Logits: [`LOGIT_OTHER`] everywhere but each row's candidates (see [`candidate`]).
    fn to_host(&self, x: &MockTensor) -> Result<Vec<f32>> {
        self.device.wait();
        let mut out = vec![LOGIT_OTHER; x.rows * x.cols];
        for (row, &state) in out.chunks_exact_mut(x.cols).zip(x.states.iter()) {
            write_logits(row, state);
        }
        Ok(out)
    }

    /// Greedy rows take their best candidate that is not banned, without writing a logit: it is the argmax over the
    /// allowed ids. Other rows (and a greedy row whose every candidate is banned) are sampled by the engine's own
    /// algorithm over the row's logits. Either way the tokens are those the host would pick from [`Self::to_host`].
    fn sample_tokens(&self, logits: &mut MockTensor, rows: &[SampleRow]) -> Option<Result<Vec<u32>>> {
        self.device.wait();
        let vocab = logits.cols;
        let mut host_row = Vec::new();
        let tokens = logits.states.iter().zip(rows).map(|(&state, row)| {
            let best_allowed = (0..N_CANDIDATES)
                .map(|rank| candidate(state, rank, vocab) as u32)
                .find(|token| !row.banned.contains(token));
            match best_allowed {
                Some(token) if row.temperature == 0.0 => token,
                _ => {
                    host_row.clear();
                    host_row.resize(vocab, LOGIT_OTHER);
                    write_logits(&mut host_row, state);
                    sample_row(row, &host_row)
                }
            }
        });
        Some(Ok(tokens.collect()))
    }

    fn kv_block_bytes(&self, layout: &KvLayout) -> usize {
        layout.block_elems() * KV_ELEM_BYTES
    }

    /// The block's states (little-endian u32, one per slot) at the start, zeros after: as many bytes as the real
    /// block would have.
    fn export_kv_block(&self, cache: &MockKvCache, layer_idx: usize, block: u32, dst: &mut [u8]) -> Result<()> {
        let slots = block_slots(cache, layer_idx, block, dst.len(), self.kv_block_bytes(&cache.layout))?;
        self.device.wait();
        let (states, zeros) = dst.split_at_mut(slots.len() * 4);
        for (d, s) in states.chunks_exact_mut(4).zip(&cache.layers[layer_idx][slots]) {
            d.copy_from_slice(&s.to_le_bytes());
        }
        zeros.fill(0);
        Ok(())
    }

    fn import_kv_block(&self, cache: &mut MockKvCache, layer_idx: usize, block: u32, src: &[u8]) -> Result<()> {
        let slots = block_slots(cache, layer_idx, block, src.len(), self.kv_block_bytes(&cache.layout))?;
        for (d, s) in cache.layers[layer_idx][slots].iter_mut().zip(src.chunks_exact(4)) {
            *d = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
        Ok(())
    }
}

/// Writes the candidates' logits of a row with `state` (the rest of `row` holds [`LOGIT_OTHER`]). Lowest rank first,
/// so that the top candidate wins if two candidates draw the same token.
fn write_logits(row: &mut [f32], state: u32) {
    for rank in (0..N_CANDIDATES).rev() {
        row[candidate(state, rank, row.len())] = LOGIT_TOP - rank as f32;
    }
}

/// The slots of `block` in layer `layer_idx`, after checking the block and the size of the caller's buffer.
fn block_slots(
    cache: &MockKvCache,
    layer_idx: usize,
    block: u32,
    n_bytes: usize,
    block_bytes: usize,
) -> Result<std::ops::Range<usize>> {
    let layout = cache.layout;
    if layer_idx >= layout.n_layers || block as usize >= layout.n_blocks || n_bytes != block_bytes {
        return Err(Error::Backend {
            backend: "mock",
            message: format!(
                "KV block access out of range: layer {layer_idx} of {}, block {block} of {}, {n_bytes} bytes (a block is {block_bytes})",
                layout.n_layers, layout.n_blocks
            ),
        });
    }
    let start = block as usize * layout.block_size;
    Ok(start..start + layout.block_size)
}

/// One step of the chain: the high half of one 64-bit multiply, into which every bit of both inputs carries. It is
/// on the critical path of every token of every layer (a 1k-token prompt of a 32-layer model is 32k dependent
/// steps), so it is one multiply rather than a full finalizer; the candidates are drawn with a full one.
fn mix(prev: u32, input: u32) -> u32 {
    let z = (((prev as u64) << 32) | input as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (z >> 32) as u32
}

/// The `rank`-th candidate token of a row with `state`, in a vocabulary of `vocab` tokens.
fn candidate(state: u32, rank: usize, vocab: usize) -> usize {
    (splitmix64(((state as u64) << 8) | rank as u64) % vocab as u64) as usize
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// When the simulated device finishes the work enqueued so far. Work runs back to back: a step's layer enqueued while
/// the device is still busy starts when it is done; one enqueued while idle starts now.
#[derive(Debug, Default)]
struct DeviceClock {
    busy_until: Mutex<Option<Instant>>,
}

impl DeviceClock {
    fn enqueue(&self, cost: Duration) {
        let mut busy_until = self.busy_until.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let start = busy_until.map_or(now, |t| t.max(now));
        *busy_until = Some(start + cost);
    }

    /// Sleeps until the enqueued work is done.
    fn wait(&self) {
        let busy_until = *self.busy_until.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(remaining) = busy_until.and_then(|t| t.checked_duration_since(Instant::now())) {
            std::thread::sleep(remaining);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqSlice;

    #[test]
    fn timing_spec_parses_prints_and_refuses_bad_input() {
        let t = MockTiming::parse("base_ms=5, prefill_token_us=40,decode_seq_us=0.5,context_token_ns=2").unwrap();
        assert_eq!(
            t,
            MockTiming {
                base_ms: 5.0,
                prefill_token_us: 40.0,
                decode_seq_us: 0.5,
                context_token_ns: 2.0
            }
        );
        assert_eq!(MockTiming::parse(&t.to_string()).unwrap(), t);
        assert!(MockTiming::parse("").unwrap().is_zero());
        assert!(MockTiming::parse("zero").unwrap().is_zero());
        assert_eq!(MockTiming::parse("base_ms=1").unwrap().prefill_token_us, 0.0);
        for (bad, says) in [
            ("base_ms", "expected KEY=VALUE"),
            ("base_ms=fast", "not a number"),
            ("base_ms=-1", "at least 0"),
            ("base_ms=inf", "finite"),
            ("base_ms=NaN", "finite"),
            ("step_ms=1", "unknown key \"step_ms\""),
        ] {
            let e = MockTiming::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?} gave {e:?}");
        }
    }

    fn seq(q_start: u32, q_len: u32, context_len: u32) -> SeqSlice {
        SeqSlice {
            q_start,
            q_len,
            context_len,
            block_table: Vec::new(),
        }
    }

    #[test]
    fn step_cost_follows_the_model() {
        let timing =
            MockTiming::parse("base_ms=2,prefill_token_us=10,decode_seq_us=100,context_token_ns=1000").unwrap();
        // One prefill chunk of 50 tokens (context 50) and two decoding sequences (contexts 200 and 300).
        let step = StepBatch {
            seqs: vec![seq(0, 50, 50), seq(50, 1, 200), seq(51, 1, 300)],
            ..StepBatch::default()
        };
        let expected_us = 2000.0 + 10.0 * 50.0 + 100.0 * 2.0 + 1.0 * 550.0;
        let cost = timing.step_cost(&step);
        assert!((cost.as_secs_f64() * 1e6 - expected_us).abs() < 1e-3, "{cost:?}");
        assert_eq!(MockTiming::default().step_cost(&step), Duration::ZERO);
        let absurd = MockTiming::parse("base_ms=1e300").unwrap();
        assert_eq!(absurd.step_cost(&step), STEP_COST_MAX);
    }

    #[test]
    fn the_device_clock_runs_work_back_to_back() {
        let clock = DeviceClock::default();
        let started = Instant::now();
        clock.enqueue(Duration::from_millis(20));
        clock.enqueue(Duration::from_millis(20));
        clock.wait();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        // Idle since: new work starts now, not at the end of the old.
        std::thread::sleep(Duration::from_millis(30));
        let again = Instant::now();
        clock.enqueue(Duration::from_millis(10));
        clock.wait();
        let waited = again.elapsed();
        assert!(
            (Duration::from_millis(10)..Duration::from_millis(30)).contains(&waited),
            "{waited:?}"
        );
    }

    fn row(temperature: f32, banned: &[u32]) -> SampleRow<'_> {
        SampleRow {
            temperature,
            top_p: 1.0,
            top_k: 0,
            seed: 7,
            draw: 3,
            banned,
        }
    }

    #[test]
    fn device_sampling_picks_what_the_host_picks_from_the_logits() {
        let backend = MockBackend::default();
        let mut logits = MockTensor {
            rows: 3,
            cols: 1000,
            states: vec![1, 2, 0xdead_beef].into(),
        };
        let host = backend.to_host(&logits).unwrap();
        for row in host.chunks_exact(1000) {
            let argmax = (0..1000)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .unwrap();
            assert_eq!(row[argmax], LOGIT_TOP);
            let candidates = row.iter().filter(|&&x| x > LOGIT_OTHER).count();
            assert!((1..=N_CANDIDATES).contains(&candidates));
        }
        let top: Vec<u32> = logits.states.iter().map(|&s| candidate(s, 0, 1000) as u32).collect();
        assert_ne!(
            top[0], top[1],
            "different states give different tokens (for these states)"
        );
        // Greedy; greedy with its top candidate banned; greedy with all but one id banned; sampled.
        let all_but_five: Vec<u32> = (0..1000).filter(|&t| t != 5).collect();
        let cases: [Vec<SampleRow>; 4] = [
            vec![row(0.0, &[]); 3],
            vec![row(0.0, &top[0..1]), row(0.0, &top[1..2]), row(0.0, &top[2..3])],
            vec![row(0.0, &all_but_five); 3],
            vec![row(1.5, &[]); 3],
        ];
        for rows in cases {
            let device = backend.sample_tokens(&mut logits, &rows).unwrap().unwrap();
            let on_host: Vec<u32> = (0..3)
                .map(|i| sample_row(&rows[i], &host[i * 1000..(i + 1) * 1000]))
                .collect();
            assert_eq!(device, on_host, "{rows:?}");
        }
    }

    #[test]
    fn kv_blocks_export_and_import_with_the_real_size() {
        let backend = MockBackend::default();
        let layout = KvLayout {
            n_layers: 2,
            n_blocks: 4,
            block_size: 16,
            n_kv_heads: 8,
            head_dim: 128,
        };
        assert_eq!(backend.kv_block_bytes(&layout), 2 * 16 * 8 * 128 * 2);
        let mut a = backend.kv_cache(&layout).unwrap();
        let mut b = backend.kv_cache(&layout).unwrap();
        for (i, s) in a.layers[1][16..32].iter_mut().enumerate() {
            *s = 1000 + i as u32;
        }
        let mut bytes = vec![0xffu8; backend.kv_block_bytes(&layout)];
        backend.export_kv_block(&a, 1, 1, &mut bytes).unwrap();
        assert!(bytes[16 * 4..].iter().all(|&x| x == 0));
        backend.import_kv_block(&mut b, 1, 3, &bytes).unwrap();
        assert_eq!(b.layers[1][48..64], a.layers[1][16..32]);
        assert!(b.layers[0].iter().all(|&s| s == 0), "other layers untouched");
        let e = backend.export_kv_block(&a, 2, 0, &mut bytes).unwrap_err().to_string();
        assert!(e.contains("layer 2 of 2"), "{e}");
        let e = backend.import_kv_block(&mut b, 0, 4, &bytes).unwrap_err().to_string();
        assert!(e.contains("block 4 of 4"), "{e}");
        let e = backend
            .import_kv_block(&mut b, 0, 0, &bytes[..10])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 bytes"), "{e}");
    }
}
