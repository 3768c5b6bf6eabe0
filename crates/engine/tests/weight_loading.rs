//! `Model::load` reads each rank's share of every weight straight from the weight source into one buffer
//! (`Backend::weight_from`). These tests pin that it gives, bit for bit, what the straightforward path gives: every
//! tensor read whole, q/k/v and gate/up stacked, then cut per rank (`Backend::weight_split`) — at 1, 2 and 4 ranks,
//! for dummy weights (bf16, f32) and Hugging Face checkpoints (f32 sharded, f16 with q/k/v bias, bf16 tied), and for
//! a stack whose parts differ in dtype (widened to f32).

mod common;

use cleave_engine::backend::cpu::{CpuBackend, CpuWeight, CpuWeightData};
use cleave_engine::backend::tensor_parallel::{Tp, TpWeight};
use cleave_engine::backend::{Backend, WeightSplit};
use cleave_engine::config::{DType, ModelConfig};
use cleave_engine::model::Model;
use cleave_engine::presets::preset;
use cleave_engine::weights::{DummyWeights, HostDType, HostSliceMut, StackedWeight, WeightSource};
use common::resolve;

/// The tiny preset with 8 query and 4 KV heads and every bias, so that 4 ranks divide it.
fn wide_config(dtype: DType) -> ModelConfig {
    ModelConfig {
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 8,
        intermediate_size: 96,
        n_layers: 2,
        qkv_bias: true,
        o_bias: true,
        dtype,
        ..preset("tiny").unwrap()
    }
}

/// Dummy weights whose k_proj and up_proj are f32 and everything else bf16: stacks of mixed dtypes.
struct MixedDtypes {
    bf16: DummyWeights,
    f32: DummyWeights,
}

impl MixedDtypes {
    fn new() -> Self {
        Self {
            bf16: DummyWeights {
                seed: 3,
                dtype: DType::BF16,
            },
            f32: DummyWeights {
                seed: 3,
                dtype: DType::F32,
            },
        }
    }

    fn pick(&self, name: &str) -> &DummyWeights {
        match name.contains("k_proj") || name.contains("up_proj") {
            true => &self.f32,
            false => &self.bf16,
        }
    }
}

impl WeightSource for MixedDtypes {
    fn has(&self, name: &str) -> bool {
        self.pick(name).has(name)
    }

    fn host_dtype(&self, name: &str, shape: &[usize]) -> cleave_engine::Result<HostDType> {
        self.pick(name).host_dtype(name, shape)
    }

    fn read_block(
        &self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: HostSliceMut<'_>,
    ) -> cleave_engine::Result<()> {
        self.pick(name).read_block(name, shape, rows, cols, out)
    }
}

/// A weight's values as bits, so that the comparison is exact (and says which dtype it holds).
fn bits(w: &CpuWeight) -> (usize, usize, &'static str, Vec<u32>) {
    let (dtype, bits) = match &w.data {
        CpuWeightData::F32(v) => ("f32", v.iter().map(|x| x.to_bits()).collect()),
        CpuWeightData::BF16(v) => ("bf16", v.iter().map(|x| x.to_bits() as u32).collect()),
    };
    (w.rows, w.cols, dtype, bits)
}

/// Every weight `Model::load` asks for, with its split, in the model's terms.
fn weight_list(c: &ModelConfig) -> Vec<(String, StackedWeight, WeightSplit)> {
    let (h, q, kv, inter, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
    let single = |name: String, shape: &[usize], split| (name.clone(), StackedWeight::single(&name, shape), split);
    let stacked = |what: String, parts: Vec<(String, usize)>, cols: &[usize]| {
        let split = WeightSplit::Outputs(parts.iter().map(|(_, rows)| *rows).collect());
        let weight = StackedWeight {
            parts,
            cols: cols.to_vec(),
        };
        (what, weight, split)
    };
    let mut list = vec![single(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        WeightSplit::Replicated,
    )];
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        let attn = |suffix: &str| {
            ["q", "k", "v"]
                .iter()
                .zip([q, kv, kv])
                .map(|(x, rows)| (format!("{p}.self_attn.{x}_proj.{suffix}"), rows))
                .collect::<Vec<_>>()
        };
        list.push(single(
            format!("{p}.input_layernorm.weight"),
            &[h],
            WeightSplit::Replicated,
        ));
        list.push(stacked(format!("{p} qkv_proj"), attn("weight"), &[h]));
        if c.qkv_bias {
            list.push(stacked(format!("{p} qkv_bias"), attn("bias"), &[]));
        }
        if c.qk_norm {
            list.push(single(
                format!("{p}.self_attn.q_norm.weight"),
                &[hd],
                WeightSplit::Replicated,
            ));
            list.push(single(
                format!("{p}.self_attn.k_norm.weight"),
                &[hd],
                WeightSplit::Replicated,
            ));
        }
        list.push(single(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q],
            WeightSplit::Inputs,
        ));
        if c.o_bias {
            list.push(single(
                format!("{p}.self_attn.o_proj.bias"),
                &[h],
                WeightSplit::Replicated,
            ));
        }
        list.push(single(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            WeightSplit::Replicated,
        ));
        let mlp = |x: &str| (format!("{p}.mlp.{x}_proj.weight"), inter);
        list.push(stacked(format!("{p} gate_up_proj"), vec![mlp("gate"), mlp("up")], &[h]));
        list.push(single(
            format!("{p}.mlp.down_proj.weight"),
            &[h, inter],
            WeightSplit::Inputs,
        ));
    }
    list.push(single("model.norm.weight".into(), &[h], WeightSplit::Replicated));
    if !c.tie_word_embeddings {
        list.push(single(
            "lm_head.weight".into(),
            &[c.vocab_size, h],
            WeightSplit::Replicated,
        ));
    }
    list
}

/// The model's weights in `weight_list`'s order.
fn loaded<W>(model: &Model<impl Backend<Weight = W>>) -> Vec<&W> {
    let mut out = vec![&model.embed_tokens];
    for layer in &model.layers {
        out.push(&layer.input_norm);
        out.push(&layer.qkv_proj);
        out.extend(&layer.qkv_bias);
        out.extend(layer.qk_norm.iter().flatten());
        out.push(&layer.o_proj);
        out.extend(&layer.o_bias);
        out.push(&layer.post_attention_norm);
        out.push(&layer.gate_up_proj);
        out.push(&layer.down_proj);
    }
    out.push(&model.norm);
    out.extend(&model.lm_head);
    out
}

/// Loads `config` from `source` at every rank count in `ranks` and compares each rank's shard of every weight with
/// the straightforward path's.
fn check(what: &str, config: ModelConfig, source: &dyn WeightSource, ranks: &[usize]) {
    let list = weight_list(&config);
    for &n in ranks {
        let tp = Tp::new(vec![CpuBackend; n]).unwrap();
        let model = Model::load(&tp, config.clone(), source).unwrap_or_else(|e| panic!("{what} at {n} ranks: {e}"));
        let got: Vec<&TpWeight<CpuWeight>> = loaded(&model);
        assert_eq!(got.len(), list.len(), "{what}: weights loaded");
        for ((name, weight, split), got) in list.iter().zip(got) {
            let expected = tp
                .weight_split(weight.read_by_stacking(source).unwrap(), split.clone())
                .unwrap();
            for (r, (g, e)) in got.shards().iter().zip(expected.shards()).enumerate() {
                assert!(bits(g) == bits(e), "{what}: {name}, rank {r} of {n}, differs");
            }
        }
    }
    // One rank without the tensor-parallel wrapper: the backend's default `weight_from`.
    let model = Model::load(&CpuBackend, config, source).unwrap();
    for ((name, weight, _), got) in list.iter().zip(loaded(&model)) {
        let expected = CpuBackend.weight(weight.read_by_stacking(source).unwrap()).unwrap();
        assert!(
            bits(got) == bits(&expected),
            "{what}: {name} on one CPU backend differs"
        );
    }
}

#[test]
fn dummy_weights_load_the_same_as_stacking_then_sharding() {
    for dtype in [DType::BF16, DType::F32] {
        let source = DummyWeights { seed: 11, dtype };
        check(&format!("wide {dtype:?}"), wide_config(dtype), &source, &[1, 2, 4]);
    }
    let tiny = preset("tiny").unwrap();
    let source = DummyWeights {
        seed: 11,
        dtype: tiny.dtype,
    };
    check("tiny", tiny, &source, &[1, 2]);
}

#[test]
fn stacks_of_mixed_dtypes_load_widened_as_when_stacked() {
    check("mixed", wide_config(DType::BF16), &MixedDtypes::new(), &[1, 2, 4]);
}

#[test]
fn checkpoints_load_the_same_as_stacking_then_sharding() {
    // f32 in two shards; f16 with q/k/v bias (Qwen2); bf16 with tied embeddings; q/k norm (Qwen3).
    for (name, ranks) in [
        ("llama", &[1, 2][..]),
        ("qwen2", &[1, 2]),
        ("llama3_rope", &[1]),
        ("qwen3", &[1, 2]),
    ] {
        let resolved = resolve(name);
        check(name, resolved.config, resolved.weights.as_ref(), ranks);
    }
}
