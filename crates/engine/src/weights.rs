//! Where a model's numbers come from: safetensors files of a Hugging Face directory (memory-mapped, sharded or not),
//! or deterministic random "dummy" weights for presets. Both hand the model [`HostTensor`]s by Hugging Face name; the
//! backend then moves them where it computes.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::Value;
use zerocopy::FromZeros;

use crate::config::{DType, read_json};
use crate::error::{Error, Result};

/// Tensor data in host memory. bf16 stays bf16 (the CPU backend computes on it directly, and decode is bound by the
/// bytes it reads); f16 is widened to f32, which is exact and saves an f16 code path on the CPU.
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// The element type of [`HostData`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostDType {
    F32,
    BF16,
}

impl HostDType {
    /// How values of a checkpoint dtype are kept on the host: bf16 as is, f16 widened to f32.
    pub fn of(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Self::BF16,
            DType::F32 | DType::F16 => Self::F32,
        }
    }
}

/// Where a block of tensor values is written: a slice of the tensor's host element type, or of f32 (bf16 widens to
/// f32 exactly, as [`HostTensor::stack_rows`] does for stacks of mixed types).
pub enum HostSliceMut<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
}

impl HostData {
    /// `n` zeros of `dtype`, from the allocator's zeroed memory: a large buffer is fresh pages the kernel clears when
    /// they are first written, so filling it is one pass over the memory. (`vec![bf16::ZERO; n]` would memset every
    /// page first — single-threaded, and the most expensive part of loading a 70B model: `vec!` only asks the
    /// allocator for zeroed memory for types it knows to be zero when all bits are.)
    pub fn zeroed(dtype: HostDType, n: usize) -> HostData {
        match dtype {
            HostDType::F32 => HostData::F32(vec![0.0; n]),
            HostDType::BF16 => HostData::BF16(
                bf16::new_vec_zeroed(n).unwrap_or_else(|_| panic!("out of memory allocating {n} bf16 values")),
            ),
        }
    }

    pub fn dtype(&self) -> HostDType {
        match self {
            HostData::F32(_) => HostDType::F32,
            HostData::BF16(_) => HostDType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_mut_slice(&mut self) -> HostSliceMut<'_> {
        match self {
            HostData::F32(v) => HostSliceMut::F32(v),
            HostData::BF16(v) => HostSliceMut::BF16(v),
        }
    }
}

impl HostSliceMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            HostSliceMut::F32(v) => v.len(),
            HostSliceMut::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` of this slice.
    pub fn slice(&mut self, range: Range<usize>) -> HostSliceMut<'_> {
        match self {
            HostSliceMut::F32(v) => HostSliceMut::F32(&mut v[range]),
            HostSliceMut::BF16(v) => HostSliceMut::BF16(&mut v[range]),
        }
    }
}

pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// Stacks tensors with the same trailing shape along their first axis (1-D tensors end to end). Mixed element
    /// types are widened to f32. (The model loads stacked weights with [`read_block`](WeightSource::read_block)
    /// straight into one buffer instead; this is the plain definition of the same thing.)
    pub fn stack_rows(parts: Vec<HostTensor>) -> HostTensor {
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let all_bf16 = parts.iter().all(|p| matches!(p.data, HostData::BF16(_)));
        // Sized up front and filled by parallel memcpy: stacking an 8B model's gate/up and q/k/v moves ~9 GB, which
        // an element-wise collect into a growing vector took ~20 s to do.
        let n = parts.iter().map(|p| p.shape.iter().product::<usize>()).sum();
        let data = if all_bf16 {
            let mut out = bf16::new_vec_zeroed(n).expect("out of memory stacking tensors");
            let mut rest = out.as_mut_slice();
            for part in &parts {
                if let HostData::BF16(v) = &part.data {
                    let (dst, tail) = rest.split_at_mut(v.len());
                    const CHUNK: usize = 1 << 20;
                    dst.par_chunks_mut(CHUNK)
                        .zip(v.par_chunks(CHUNK))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                    rest = tail;
                }
            }
            HostData::BF16(out)
        } else {
            let mut out = Vec::with_capacity(n);
            for part in &parts {
                match &part.data {
                    HostData::F32(v) => out.extend_from_slice(v),
                    HostData::BF16(v) => out.extend(v.iter().map(|x| x.to_f32())),
                }
            }
            HostData::F32(out)
        };
        HostTensor { shape, data }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// A weight as the model loads it: tensors of one trailing shape stacked along their first axis (q/k/v, gate/up),
/// or a single tensor.
#[derive(Clone, Debug)]
pub struct StackedWeight {
    /// Each part's Hugging Face name and rows, in stacking order.
    pub parts: Vec<(String, usize)>,
    /// The trailing shape all parts share (empty for vectors).
    pub cols: Vec<usize>,
}

impl StackedWeight {
    pub fn single(name: &str, shape: &[usize]) -> Self {
        let (&rows, cols) = shape.split_first().expect("a weight has at least one axis");
        Self {
            parts: vec![(name.to_string(), rows)],
            cols: cols.to_vec(),
        }
    }

    /// The stacked shape.
    pub fn shape(&self) -> Vec<usize> {
        self.part_shape(self.parts.iter().map(|(_, rows)| rows).sum())
    }

    fn part_shape(&self, rows: usize) -> Vec<usize> {
        [&[rows][..], &self.cols].concat()
    }

    /// bf16 when every part is, else f32 (as [`HostTensor::stack_rows`] widens a mixed stack).
    pub fn host_dtype(&self, source: &dyn WeightSource) -> Result<HostDType> {
        for (name, rows) in &self.parts {
            if source.host_dtype(name, &self.part_shape(*rows))? == HostDType::F32 {
                return Ok(HostDType::F32);
            }
        }
        Ok(HostDType::BF16)
    }

    /// [`WeightSource::read_block`] of the stacked matrix: rows `rows` may span parts.
    pub fn read_block(
        &self,
        source: &dyn WeightSource,
        rows: Range<usize>,
        cols: Range<usize>,
        mut out: HostSliceMut<'_>,
    ) -> Result<()> {
        let (mut part_start, mut at) = (0, 0);
        for (name, part_rows) in &self.parts {
            let part = part_start..part_start + part_rows;
            part_start = part.end;
            let (first, end) = (rows.start.max(part.start), rows.end.min(part.end));
            if first >= end {
                continue;
            }
            let len = (end - first) * cols.len();
            let dst = out.slice(at..at + len);
            source.read_block(
                name,
                &self.part_shape(*part_rows),
                first - part.start..end - part.start,
                cols.clone(),
                dst,
            )?;
            at += len;
        }
        assert_eq!(at, out.len(), "rows {rows:?} of a stack of {part_start} rows");
        Ok(())
    }

    /// The straightforward way to the same values: each part whole, then stacked.
    pub fn read_by_stacking(&self, source: &dyn WeightSource) -> Result<HostTensor> {
        let parts = self
            .parts
            .iter()
            .map(|(name, rows)| source.tensor(name, &self.part_shape(*rows)))
            .collect::<Result<Vec<_>>>()?;
        Ok(HostTensor::stack_rows(parts))
    }
}

/// Something that yields tensors by Hugging Face name, checked against the shape the model expects. Sources are
/// read from several threads at once (the blocks of a tensor are filled in parallel, and a tensor-parallel load
/// reads one rank's shard while the previous one is uploaded).
pub trait WeightSource: Send + Sync {
    fn has(&self, name: &str) -> bool;

    /// The element type [`WeightSource::tensor`] gives for `name`, once its shape is checked against `shape`.
    fn host_dtype(&self, name: &str, shape: &[usize]) -> Result<HostDType>;

    /// Writes the block `rows` × `cols` of tensor `name` — seen as the matrix `(shape[0], the product of the rest)`,
    /// a 1-D tensor as one column — into `out`, row after row, in parallel. `out` holds exactly
    /// `rows.len() * cols.len()` elements of [`host_dtype`](WeightSource::host_dtype)'s type, or f32. So a stacked
    /// weight, or one tensor-parallel rank's share of it, is read straight into its final buffer.
    fn read_block(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
        cols: Range<usize>,
        out: HostSliceMut<'_>,
    ) -> Result<()>;

    /// The whole tensor.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let (n_rows, n_cols) = matrix_dims(shape);
        let mut data = HostData::zeroed(self.host_dtype(name, shape)?, n_rows * n_cols);
        self.read_block(name, shape, 0..n_rows, 0..n_cols, data.as_mut_slice())?;
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }
}

/// `shape` as the matrix `(rows, cols)` that [`WeightSource::read_block`] cuts: the first axis by the product of the
/// others (a 1-D tensor is one column, a scalar one element).
pub fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape.split_first() {
        Some((&rows, rest)) => (rows, rest.iter().product()),
        None => (1, 1),
    }
}

/// Fills `out` with the block `rows` × `cols` of a row-major matrix of `n_cols` columns, in parallel pieces:
/// `fill(dst, first)` writes into `dst` the matrix's elements from flat index `first` on (a piece never crosses a
/// row of the block unless the block spans whole rows, where the elements are contiguous).
fn fill_block<T: Send>(
    out: &mut [T],
    n_cols: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    fill: impl Fn(&mut [T], usize) + Sync,
) {
    // Large enough to amortise a task, small enough to spread a norm vector's or a bias's few thousand elements.
    const CHUNK: usize = 1 << 14;
    let width = cols.len();
    assert!(
        out.len() == rows.len() * width && cols.end <= n_cols,
        "block {rows:?} x {cols:?} of a matrix of {n_cols} columns into {} elements",
        out.len()
    );
    if out.is_empty() {
        return;
    }
    if width == n_cols {
        let first = rows.start * n_cols;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, dst)| fill(dst, first + c * CHUNK));
    } else {
        out.par_chunks_mut(width)
            .with_min_len(CHUNK.div_ceil(width))
            .enumerate()
            .for_each(|(r, dst)| fill(dst, (rows.start + r) * n_cols + cols.start));
    }
}

struct TensorEntry {
    file_idx: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range inside the memory-mapped file.
    start: usize,
    end: usize,
}

/// The safetensors files of one model directory, memory-mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, TensorEntry>,
}

impl SafetensorsDir {
    /// Opens `model.safetensors.index.json`'s shards, or every `*.safetensors` file when there is no index.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<String> = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    message: "field \"weight_map\" is missing or not an object".into(),
                })?;
            let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
            files.sort();
            files.dedup();
            files
        } else {
            let read_dir = std::fs::read_dir(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            read_dir
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect()
        };
        names.sort();
        if names.is_empty() {
            return Err(Error::Weights {
                path: dir.to_path_buf(),
                message: "no *.safetensors files in the model directory".into(),
            });
        }
        let mut files = Vec::with_capacity(names.len());
        let mut entries = HashMap::new();
        for (file_idx, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the map is read-only and we never write through it; a file truncated by another process while
            // we run is outside what any model loader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(&mmap[..]).map_err(|e| Error::Weights {
                    path: path.clone(),
                    message: format!(
                        "not a valid safetensors file ({} bytes; truncated or corrupt?): {e}",
                        mmap.len()
                    ),
                })?;
            let data_start = 8 + header_len;
            for (tensor_name, info) in metadata.tensors() {
                let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
                if end > mmap.len() {
                    return Err(Error::Weights {
                        path: path.clone(),
                        message: format!(
                            "tensor {tensor_name:?} ends at byte {end} but the file has {} bytes (truncated?)",
                            mmap.len()
                        ),
                    });
                }
                entries.insert(
                    tensor_name,
                    TensorEntry {
                        file_idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }
}

impl SafetensorsDir {
    /// The tensor's bytes and element type, once its name, shape, dtype and size are checked.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<(&[u8], DType)> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            dir: self.dir.clone(),
        })?;
        let (path, mmap) = &self.files[entry.file_idx];
        let err = |message: String| Error::Weights {
            path: path.clone(),
            message,
        };
        if entry.shape != shape {
            return Err(err(format!(
                "tensor {name:?} has shape {:?}; the config implies {shape:?}",
                entry.shape
            )));
        }
        let bytes = &mmap[entry.start..entry.end];
        let n: usize = shape.iter().product();
        let (dtype, elem) = match entry.dtype {
            safetensors::Dtype::F32 => (DType::F32, 4),
            safetensors::Dtype::BF16 => (DType::BF16, 2),
            safetensors::Dtype::F16 => (DType::F16, 2),
            other => {
                return Err(err(format!(
                    "tensor {name:?} has dtype {other:?}; cleave reads F32, BF16 and F16"
                )));
            }
        };
        if bytes.len() != n * elem {
            return Err(err(format!(
                "tensor {name:?} holds {} bytes, expected {} for shape {shape:?}",
                bytes.len(),
                n * elem
            )));
        }
        Ok((bytes, dtype))
    }
}

impl WeightSource for SafetensorsDir {
    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn host_dtype(&self, name: &str, shape: &[usize]) -> Result<HostDType> {
        Ok(HostDType::of(self.checked(name, shape)?.1))
    }

    fn read_block(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
        cols: Range<usize>,
        out: HostSliceMut<'_>,
    ) -> Result<()> {
        let (bytes, dtype) = self.checked(name, shape)?;
        let n_cols = matrix_dims(shape).1;
        let f32_at =
            |i: usize| f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
        let bits_at = |i: usize| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        match (dtype, out) {
            (DType::BF16, HostSliceMut::BF16(out)) => fill_block(out, n_cols, rows, cols, |dst, first| {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = bf16::from_bits(bits_at(first + j));
                }
            }),
            (DType::BF16, HostSliceMut::F32(out)) => fill_block(out, n_cols, rows, cols, |dst, first| {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = bf16::from_bits(bits_at(first + j)).to_f32();
                }
            }),
            (DType::F16, HostSliceMut::F32(out)) => fill_block(out, n_cols, rows, cols, |dst, first| {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = f16::from_bits(bits_at(first + j)).to_f32();
                }
            }),
            (DType::F32, HostSliceMut::F32(out)) => fill_block(out, n_cols, rows, cols, |dst, first| {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = f32_at(first + j);
                }
            }),
            (DType::F32 | DType::F16, HostSliceMut::BF16(_)) => {
                panic!("read_block: tensor {name:?} is {dtype:?}, read into bf16 (a caller bug: see host_dtype)")
            }
        }
        Ok(())
    }
}

/// Deterministic random weights: the standard way serving systems are benchmarked when the numbers do not matter
/// but the shapes and bytes do. Each tensor's values depend only on the seed and the tensor's name, so two processes
/// (a prefill and a decode worker) build the same model without sharing files.
pub struct DummyWeights {
    pub seed: u64,
    pub dtype: DType,
}

impl DummyWeights {
    /// Element `i` (row-major) of tensor `name` of `shape`, before rounding to the source's dtype.
    fn value_fn(&self, name: &str, shape: &[usize]) -> impl Fn(usize) -> f32 + Sync + use<> {
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        // Norm weights near 1, biases small, matrices scaled by 1/sqrt(fan_in) so activations stay O(1) through the
        // layers; embeddings O(1) so logits are not flat.
        let (center, half_width) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else if name.ends_with(".bias") {
            (0.0, 0.1)
        } else if name.contains("embed_tokens") {
            (0.0, 1.0)
        } else {
            (0.0, (3.0 / fan_in).sqrt())
        };
        let tensor_seed = splitmix64(self.seed ^ fnv1a(name.as_bytes()));
        move |i: usize| {
            let r = splitmix64(tensor_seed.wrapping_add(i as u64));
            let unit = (r >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            center + half_width * (2.0 * unit - 1.0)
        }
    }
}

impl WeightSource for DummyWeights {
    fn has(&self, _name: &str) -> bool {
        true
    }

    fn host_dtype(&self, _name: &str, _shape: &[usize]) -> Result<HostDType> {
        Ok(HostDType::of(self.dtype))
    }

    fn read_block(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
        cols: Range<usize>,
        out: HostSliceMut<'_>,
    ) -> Result<()> {
        let value = self.value_fn(name, shape);
        let n_cols = matrix_dims(shape).1;
        match (self.dtype, out) {
            (DType::BF16, HostSliceMut::BF16(out)) => fill_block(out, n_cols, rows, cols, |dst, first| {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = bf16::from_f32(value(first + j));
                }
            }),
            (DType::BF16, HostSliceMut::F32(out)) => fill_block(out, n_cols, rows, cols, |dst, first| {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = bf16::from_f32(value(first + j)).to_f32();
                }
            }),
            (DType::F32 | DType::F16, HostSliceMut::F32(out)) => fill_block(out, n_cols, rows, cols, |dst, first| {
                for (j, x) in dst.iter_mut().enumerate() {
                    *x = value(first + j);
                }
            }),
            (dtype @ (DType::F32 | DType::F16), HostSliceMut::BF16(_)) => {
                panic!("read_block: dummy tensor {name:?} is {dtype:?}, read into bf16 (a caller bug: see host_dtype)")
            }
        }
        Ok(())
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &HostTensor) -> Vec<u32> {
        match &t.data {
            HostData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        }
    }

    /// Dummy values as first defined, element by element: reading them by blocks must not change one, or separately
    /// built workers (and benchmarks across commits) would hold different models.
    #[test]
    fn dummy_values_are_a_function_of_seed_name_and_index() {
        let shape = [48, 40];
        for (name, center, half_width) in [
            ("model.layers.0.mlp.up_proj.weight", 0.0f32, (3.0f32 / 40.0).sqrt()),
            ("model.layers.1.input_layernorm.weight", 1.0, 0.1),
            ("model.layers.1.self_attn.q_proj.bias", 0.0, 0.1),
            ("model.embed_tokens.weight", 0.0, 1.0),
        ] {
            let seed = splitmix64(5 ^ fnv1a(name.as_bytes()));
            let formula = |i: usize| {
                let unit = (splitmix64(seed.wrapping_add(i as u64)) >> 40) as f32 / (1u64 << 24) as f32;
                center + half_width * (2.0 * unit - 1.0)
            };
            for dtype in [DType::BF16, DType::F32] {
                let t = DummyWeights { seed: 5, dtype }.tensor(name, &shape).unwrap();
                let expected: Vec<u32> = (0..48 * 40)
                    .map(|i| match dtype {
                        DType::BF16 => bf16::from_f32(formula(i)).to_bits() as u32,
                        _ => formula(i).to_bits(),
                    })
                    .collect();
                assert!(bits(&t) == expected, "{name} {dtype:?}");
            }
        }
    }

    #[test]
    fn a_block_is_the_whole_tensor_cut_and_bf16_widens_exactly() {
        let source = DummyWeights {
            seed: 1,
            dtype: DType::BF16,
        };
        let (name, shape) = ("w", [70_000, 3]); // more elements than one fill piece
        let whole = source.tensor(name, &shape).unwrap().to_f32();
        for (rows, cols) in [(3..7, 0..3), (100..69_000, 1..3), (0..70_000, 2..3), (5..5, 0..3)] {
            let mut out = vec![0f32; rows.len() * cols.len()];
            source
                .read_block(name, &shape, rows.clone(), cols.clone(), HostSliceMut::F32(&mut out))
                .unwrap();
            let expected: Vec<f32> = rows
                .clone()
                .flat_map(|r| cols.clone().map(|c| whole[r * 3 + c]).collect::<Vec<_>>())
                .collect();
            assert!(out == expected, "rows {rows:?} cols {cols:?}");
        }
    }
}
