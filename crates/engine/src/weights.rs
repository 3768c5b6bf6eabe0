//! Where a model's numbers come from: safetensors files of a Hugging Face directory (memory-mapped, sharded or not),
//! or deterministic random "dummy" weights for presets. Both hand the model [`HostTensor`]s by Hugging Face name; the
//! backend then moves them where it computes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::Value;

use crate::config::{DType, read_json};
use crate::error::{Error, Result};

/// Tensor data in host memory. bf16 stays bf16 (the CPU backend computes on it directly, and decode is bound by the
/// bytes it reads); f16 is widened to f32, which is exact and saves an f16 code path on the CPU.
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// Stacks tensors with the same trailing shape along their first axis (1-D tensors end to end). Mixed element
    /// types are widened to f32.
    pub fn stack_rows(parts: Vec<HostTensor>) -> HostTensor {
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let all_bf16 = parts.iter().all(|p| matches!(p.data, HostData::BF16(_)));
        // Sized up front and filled by parallel memcpy: stacking an 8B model's gate/up and q/k/v moves ~9 GB, which
        // an element-wise collect into a growing vector took ~20 s to do.
        let n = parts.iter().map(|p| p.shape.iter().product::<usize>()).sum();
        let data = if all_bf16 {
            let mut out = vec![bf16::ZERO; n];
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

/// Something that yields tensors by Hugging Face name, checked against the shape the model expects.
pub trait WeightSource {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor>;
    fn has(&self, name: &str) -> bool;
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

impl WeightSource for SafetensorsDir {
    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
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
        let data = match dtype {
            DType::F32 => HostData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            DType::BF16 => HostData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
            ),
            DType::F16 => HostData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                    .collect(),
            ),
        };
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }
}

/// Deterministic random weights: the standard way serving systems are benchmarked when the numbers do not matter
/// but the shapes and bytes do. Each tensor's values depend only on the seed and the tensor's name, so two processes
/// (a prefill and a decode worker) build the same model without sharing files.
pub struct DummyWeights {
    pub seed: u64,
    pub dtype: DType,
}

impl WeightSource for DummyWeights {
    fn has(&self, _name: &str) -> bool {
        true
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let n: usize = shape.iter().product();
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
        const CHUNK: usize = 1 << 16;
        let value = |i: usize| {
            let r = splitmix64(tensor_seed.wrapping_add(i as u64));
            let unit = (r >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            center + half_width * (2.0 * unit - 1.0)
        };
        let data = match self.dtype {
            DType::F32 | DType::F16 => {
                let mut v = vec![0f32; n];
                v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                    for (j, x) in out.iter_mut().enumerate() {
                        *x = value(c * CHUNK + j);
                    }
                });
                HostData::F32(v)
            }
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; n];
                v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                    for (j, x) in out.iter_mut().enumerate() {
                        *x = bf16::from_f32(value(c * CHUNK + j));
                    }
                });
                HostData::BF16(v)
            }
        };
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
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
