//! The CUDA backend: our kernels (`kernels.cu`, compiled at run time by NVRTC for the device and cached on disk),
//! cuBLAS for the linear layers, and plain `cuMemAlloc` memory — no stream-ordered pool — so that the KV pool can later
//! be exported through CUDA IPC to a prefill worker.
//!
//! CUDA libraries are opened at run time (cudarc's dynamic loading): the same binary runs on machines without a GPU,
//! where [`CudaBackend::new`] returns an error saying what is missing instead of panicking inside cudarc.
//!
//! Activations and the KV cache use the checkpoint's precision: f32 for f32 checkpoints, bf16 otherwise (f16
//! checkpoints are computed in bf16). Every kernel accumulates in f32.

mod tensor_parallel;
pub use tensor_parallel::{NcclGroup, probe_nccl, tensor_parallel};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{
    AttentionShape, Backend, KvCacheExport, KvHeadSlice, KvLayout, KvShareKind, PeerKvCache, SeqSlice, StepBatch,
};
use crate::config::{DType, ModelConfig};
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::sampler::SampleRow;
use crate::weights::{HostData, HostTensor};

const KERNELS_CU: &str = include_str!("kernels.cu");

fn err(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        message: message.into(),
    }
}

fn driver<T>(what: &str, r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| err(format!("{what}: {e}")))
}

/// Device memory from `cuMemAlloc`, returned to the backend's cache on drop (re-allocating per step would
/// synchronise the device every time).
pub struct DeviceBuffer {
    ptr: CUdeviceptr,
    bytes: usize,
    allocator: Arc<Allocator>,
    /// False for an alias of memory owned elsewhere (a graph's output), which must not be returned on drop.
    recycle: bool,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if !self.recycle {
            return;
        }
        self.allocator
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(self.bytes)
            .or_default()
            .push(self.ptr);
    }
}

/// A cache of device allocations by size class. Work that uses these buffers runs on the compute stream (the KV
/// copy stream's tables are held until it is synchronised), so a buffer released by the host can be handed to the
/// next user at once: the stream orders the uses.
struct Allocator {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    free: Mutex<HashMap<usize, Vec<CUdeviceptr>>>,
}

/// Sizes are rounded up to classes (powers of two up to 1 MiB, then 16 steps per power of two, at most 1/16 waste) so
/// that steps of slightly different token counts reuse each other's buffers; exact sizes would let the cache grow
/// with every new step shape until the GPU runs out. Allocations of 1 GiB and more (the KV pool, big embeddings)
/// are made once and stay exact.
fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(256);
    match bytes {
        ..=0x10_0000 => bytes.next_power_of_two(),
        0x10_0001..0x4000_0000 => bytes.next_multiple_of(bytes.next_power_of_two() / 32),
        _ => bytes.next_multiple_of(256),
    }
}

impl Allocator {
    fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        self.try_alloc(bytes).map_err(|e| out_of_memory(bytes, e))
    }

    fn try_alloc(self: &Arc<Self>, bytes: usize) -> std::result::Result<DeviceBuffer, DriverError> {
        let bytes = size_class(bytes);
        let cached = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&bytes)
            .and_then(Vec::pop);
        let ptr = match cached {
            Some(p) => p,
            None => {
                self.ctx.bind_to_thread()?;
                // SAFETY: a plain device allocation; freed in release_cached or Allocator::drop.
                unsafe { cudarc::driver::result::malloc_sync(bytes) }?
            }
        };
        Ok(DeviceBuffer {
            ptr,
            bytes,
            allocator: self.clone(),
            recycle: true,
        })
    }
}

impl Allocator {
    /// Frees every cached buffer (after the stream has finished with them); returns how many. The caller makes
    /// sure no captured graph that may still be launched uses them.
    fn release_cached(&self) -> usize {
        if self.stream.synchronize().is_err() {
            return 0;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for (_, ptrs) in free.drain() {
            for p in ptrs {
                // SAFETY: cached pointers came from malloc_sync and nothing queued uses them (synchronised above).
                let _ = unsafe { cudarc::driver::result::free_sync(p) };
                n += 1;
            }
        }
        tracing::debug!(buffers = n, "returned cached GPU buffers to the driver");
        n
    }
}

fn out_of_memory(bytes: usize, e: DriverError) -> Error {
    let (free, total) = cudarc::driver::result::mem_get_info().unwrap_or((0, 0));
    err(format!(
        "cannot allocate {} MiB on the GPU ({} MiB free of {} MiB): {e}. Use a smaller model, a smaller KV cache or fewer tokens per step",
        bytes >> 20,
        free >> 20,
        total >> 20
    ))
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for ptrs in self.free.get_mut().unwrap_or_else(|e| e.into_inner()).values() {
            for &p in ptrs {
                // SAFETY: every pointer here came from malloc_sync and is no longer referenced.
                let _ = unsafe { cudarc::driver::result::free_sync(p) };
            }
        }
    }
}

/// A `(rows, cols)` tensor on the device, in the backend's element type.
pub struct CudaTensor {
    pub buf: DeviceBuffer,
    pub rows: usize,
    pub cols: usize,
}

pub struct CudaWeight {
    pub buf: DeviceBuffer,
    pub rows: usize,
    pub cols: usize,
}

/// The whole KV pool in one allocation: layer `l` starts at `l * layer_bytes`.
pub struct CudaKvCache {
    pub pool: DeviceBuffer,
    pub layout: KvLayout,
    pub layer_bytes: usize,
}

impl CudaTensor {
    /// The same memory, not owned: dropping it leaves the buffer with its owner.
    fn alias(&self) -> CudaTensor {
        let buf = DeviceBuffer {
            ptr: self.buf.ptr,
            bytes: self.buf.bytes,
            allocator: self.buf.allocator.clone(),
            recycle: false,
        };
        CudaTensor {
            buf,
            rows: self.rows,
            cols: self.cols,
        }
    }
}

impl CudaKvCache {
    fn layer_ptr(&self, layer_idx: usize) -> u64 {
        self.pool.ptr() + (layer_idx * self.layer_bytes) as u64
    }
}

/// The sampling kernels (`sample_rows` in kernels.cu), by element type of the logits.
const SAMPLE_KERNELS: [&str; 2] = ["sample_f32", "sample_bf16"];
/// Dynamic shared memory of the sampling kernel per thread (`SAMPLE_SMEM_PER_THREAD` in kernels.cu), and a bound on
/// its static shared memory.
const SAMPLE_SMEM_PER_THREAD: usize = 16 * 12;
const SAMPLE_STATIC_SMEM: usize = 2048;

/// Context tokens one block of the decode attention kernel walks at most (see `attention`).
const ATTENTION_SPLIT_TOKENS: usize = 1024;
/// Rows of x up to which the `gemv_m*` kernels compute a product.
const GEMV_M_MAX: usize = 8;
/// Rows of w per block of the `gemv_m*` kernels: GEMV_WARPS × GEMV_ROWS in kernels.cu.
const GEMV_ROWS_PER_BLOCK: usize = 8;

/// One step's inputs, uploaded once.
pub struct CudaBatch {
    token_ids: u64,
    positions: u64,
    slots: u64,
    seq_of_row: u64,
    seq_meta: u64,
    block_tables: u64,
    logit_rows: u64,
    /// Query tiles of one sequence for the tensor-core prefill kernels, (seq, first row, rows, 0): list `k` holds
    /// tiles of up to `16 << k` rows (see [`TILE_ROWS`]).
    prefill_tiles: [u64; TILE_ROWS.len()],
    n_prefill_tiles: [usize; TILE_ROWS.len()],
    /// Longest run of new tokens of one sequence in the step.
    q_len_max: usize,
    /// Most blocks in one sequence's table (a graph's batch: the table stride it was captured with), which bounds
    /// every context of the step.
    table_blocks_max: usize,
    n_tokens: usize,
    n_logit_rows: usize,
    /// The buffers behind the pointers, when the batch owns them (a graph's batch points into the graph's).
    _buffers: Vec<DeviceBuffer>,
}

/// A decode step captured as a CUDA graph for one batch-size bucket. Inputs live in buffers owned here, at the
/// addresses the graph was captured with; each replay overwrites them first.
struct DecodeGraph {
    graph: cudarc::driver::CudaGraph,
    inputs: GraphInputs,
    /// The step's logits, written by every replay.
    logits: CudaTensor,
}

/// All of a captured step's inputs in one buffer, so each replay needs one upload. u32 words, in this order:
/// seq_meta (4 per row, first for 16-byte alignment), token ids, positions, slots, seq_of_row, logit rows, then room
/// for `bucket × table_stride` block-table entries. The tables are packed (each row's offset is in its seq_meta),
/// so a replay uploads only the entries its rows use.
pub struct GraphInputs {
    buf: DeviceBuffer,
    bucket: usize,
    table_stride: usize,
}

impl GraphInputs {
    fn words(bucket: usize, table_stride: usize) -> usize {
        9 * bucket + bucket * table_stride
    }

    fn batch(&self) -> CudaBatch {
        let (b, base) = (self.bucket as u64, self.buf.ptr);
        let at = |word: u64| base + 4 * word;
        CudaBatch {
            seq_meta: at(0),
            token_ids: at(4 * b),
            positions: at(5 * b),
            slots: at(6 * b),
            seq_of_row: at(7 * b),
            logit_rows: at(8 * b),
            block_tables: at(9 * b),
            prefill_tiles: [0; TILE_ROWS.len()],
            n_prefill_tiles: [0; TILE_ROWS.len()],
            q_len_max: 1,
            table_blocks_max: self.table_stride,
            n_tokens: self.bucket,
            n_logit_rows: self.bucket,
            _buffers: Vec::new(),
        }
    }

    fn host_words(&self, step: &StepBatch, scratch_block: u32, block_size: u32) -> Vec<u32> {
        graph_input_words(step, self.bucket, scratch_block, block_size)
    }
}

/// The leading words of a captured step's inputs (layout in [`GraphInputs`]) — the rest of the buffer is not read:
/// the step's rows with their block tables packed one after another, then padding rows — token 0 at position 0,
/// each a one-token sequence in the scratch block, all sharing one table entry after the step's. Each table must fit
/// the graph's stride (the caller checks), so the packed tables fit `bucket × stride`.
fn graph_input_words(step: &StepBatch, bucket: usize, scratch_block: u32, block_size: u32) -> Vec<u32> {
    let b = bucket;
    let mut w = vec![0u32; 9 * b];
    for i in 0..b {
        let seq = step.seqs.get(i);
        let table_offset = (w.len() - 9 * b) as u32;
        let context_len = match seq {
            Some(s) => {
                w.extend_from_slice(&s.block_table);
                s.context_len
            }
            None => 1,
        };
        w[4 * i..4 * i + 4].copy_from_slice(&[i as u32, 1, context_len, table_offset]);
        w[4 * b + i] = step.token_ids.get(i).copied().unwrap_or(0);
        w[5 * b + i] = step.positions.get(i).copied().unwrap_or(0);
        w[6 * b + i] = step.slots.get(i).copied().unwrap_or(scratch_block * block_size);
        w[7 * b + i] = i as u32;
        w[8 * b + i] = i as u32;
    }
    let padding_table = (w.len() - 9 * b) as u32;
    for i in step.seqs.len()..b {
        w[4 * i + 3] = padding_table;
    }
    if step.seqs.len() < b {
        w.push(scratch_block);
    }
    w
}

/// Element type of activations, KV cache and weights on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    BF16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    BF16,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::BF16 => 2,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::BF16 => "bf16",
        }
    }

    fn cuda_type(self) -> cublas_sys::cudaDataType {
        match self {
            Elem::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
            Elem::BF16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    allocator: Arc<Allocator>,
    functions: HashMap<String, CudaFunction>,
    _module: Arc<CudaModule>,
    elem: Elem,
    rope_table: Mutex<Option<(Vec<f32>, DeviceBuffer)>>,
    device_name: String,
    arch: String,
    n_sms: usize,
    /// Threads per block of the sampling kernel (one block per row).
    sample_threads: u32,
    /// Decode graphs by batch-size bucket; `None` when disabled (`CLEAVE_CUDA_GRAPHS=0`).
    graphs: Option<Mutex<HashMap<usize, DecodeGraph>>>,
    /// Graphs dropped by `release_cached`, freed when the next step starts.
    retired_graphs: Mutex<Vec<DecodeGraph>>,
    /// The KV pool's scratch block (one past the engine's) and block size, set when the pool is allocated.
    scratch_block: std::sync::atomic::AtomicU32,
    block_size: std::sync::atomic::AtomicU32,
    /// cuBLAS's workspace, set explicitly so that captured GEMMs never allocate.
    _blas_workspace: DeviceBuffer,
    /// The bf16 prefill attention kernel where its shape allows (falls back to the next one otherwise).
    prefill_kernel: PrefillKernel,
    /// Which kernel computes bf16 products of few rows (decode steps); see [`GemvPolicy`].
    gemv: GemvPolicy,
    /// Where KV copies to a peer's pool run, so that layer i's copy overlaps layer i + 1's compute.
    copy_stream: Arc<CudaStream>,
    /// Block-pair tables of copies queued on `copy_stream`, kept alive until `finish_peer_copies`.
    peer_copy_tables: Mutex<Vec<DeviceBuffer>>,
    /// With `CLEAVE_PROFILE_OPS=1`: an event recorded on the compute stream before each kernel or GEMM, with the op's
    /// name, so that [`Backend::take_op_profile`] can say where a step's GPU time goes (graphs are then off).
    op_events: Option<Mutex<Vec<(String, cudarc::driver::CudaEvent)>>>,
}

// SAFETY: the backend is used from one thread at a time (the engine's); cudarc's handles are bound to the context
// before each call.
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

/// Whether the CUDA driver, cuBLAS and NVRTC libraries can be opened, and a GPU is present. `Err` says what is missing.
pub fn probe() -> Result<usize> {
    // SAFETY: these only try to dlopen the libraries.
    let present = unsafe {
        [
            ("the CUDA driver (libcuda.so)", cudarc::driver::sys::is_culib_present()),
            ("cuBLAS (libcublas.so)", cudarc::cublas::sys::is_culib_present()),
            ("cuBLASLt (libcublasLt.so)", cudarc::cublaslt::sys::is_culib_present()),
            ("NVRTC (libnvrtc.so)", cudarc::nvrtc::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = present.iter().filter(|(_, ok)| !ok).map(|(name, _)| *name).collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "cannot load {}; install the NVIDIA driver and CUDA 13 libraries, or add their folder (e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH",
            missing.join(", ")
        )));
    }
    driver("cuInit", cudarc::driver::result::init())?;
    let n = driver("counting GPUs", cudarc::driver::result::device::get_count())?;
    if n <= 0 {
        return Err(err("no CUDA GPU is visible"));
    }
    Ok(n as usize)
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles (or loads cached) kernels for it. Activations follow `config.dtype`.
    pub fn new(ordinal: usize, config: &ModelConfig) -> Result<Self> {
        let precision = match config.dtype {
            DType::F32 => Precision::F32,
            DType::BF16 | DType::F16 => Precision::BF16,
        };
        Self::with_precision(ordinal, precision)
    }

    /// Opens GPU `ordinal` computing in `precision` whatever the checkpoint's dtype (weights are converted on load).
    pub fn with_precision(ordinal: usize, precision: Precision) -> Result<Self> {
        let n_gpus = probe()?;
        if ordinal >= n_gpus {
            return Err(err(format!("GPU {ordinal} requested but {n_gpus} visible")));
        }
        let ctx = driver("creating the CUDA context", CudaContext::new(ordinal))?;
        let stream = driver("creating a stream", ctx.new_stream())?;
        let copy_stream = driver("creating the KV copy stream", ctx.new_stream())?;
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())
            .map_err(|e| err(format!("creating the cuBLAS handle: {e}")))?;
        let (major, minor) = driver("reading the compute capability", ctx.compute_capability())?;
        let arch = format!("sm_{major}{minor}");
        let device_name = driver("reading the device name", ctx.name())?;
        let module = load_kernels(&ctx, &arch)?;
        let mut functions = HashMap::new();
        let elem = match precision {
            Precision::F32 => Elem::F32,
            Precision::BF16 => Elem::BF16,
        };
        let generic = [
            "embed",
            "rms_norm",
            "add_rms_norm",
            "qkv_rope_kv",
            "silu_mul",
            "add_bias",
            "gather_rows",
            "to_float",
            "attention",
            "attention_merge",
        ];
        let names = generic
            .iter()
            .map(|n| format!("{n}_{}", elem.suffix()))
            .chain((1..=8).map(|g| format!("attention_gqa{g}_{}", elem.suffix())))
            .chain((1..=GEMV_M_MAX).map(|m| format!("gemv_m{m}_bf16")))
            .chain(SAMPLE_KERNELS.map(String::from))
            .chain(["copy_u128", "copy_kv_blocks", "copy_kv_heads", "flash_prefill_bf16"].map(String::from))
            .chain(FA2_HEADS_PER_BLOCK.map(flash2_name))
            .chain(FA2_HEADS_PER_BLOCK.map(flash2q_name));
        for name in names {
            let f = module
                .load_function(&name)
                .map_err(|e| err(format!("kernel {name} is missing from the module: {e}")))?;
            functions.insert(name, f);
        }
        let fa2_kernels = FA2_HEADS_PER_BLOCK.map(|hg| (flash2_name(hg), FA2_SMEM_BYTES));
        let fa2q_kernels = FA2_HEADS_PER_BLOCK.map(|hg| (flash2q_name(hg), FA2Q_SMEM_BYTES));
        for (name, bytes) in fa2_kernels.into_iter().chain(fa2q_kernels) {
            driver(
                &format!("allowing {name} {bytes} bytes of shared memory"),
                functions[&name].set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                ),
            )?;
        }
        let prefill_kernel = match std::env::var("CLEAVE_PREFILL_ATTENTION").as_deref() {
            Ok("fa2") => PrefillKernel::Flash2,
            Ok("wmma") => PrefillKernel::Wmma,
            Ok("decode") => PrefillKernel::Decode,
            _ => PrefillKernel::Flash2SharedQ,
        };
        let gemv = GemvPolicy::from_env()?;
        let n_sms = driver(
            "reading the SM count",
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )? as usize;
        // The sampling kernel keeps SAMPLE_SMEM_PER_THREAD bytes of bins per thread: as many threads as fit.
        let smem_optin = driver(
            "reading the shared memory limit",
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            ),
        )? as usize;
        let sample_threads = [1024, 512, 256]
            .into_iter()
            .find(|t| t * SAMPLE_SMEM_PER_THREAD + SAMPLE_STATIC_SMEM <= smem_optin)
            .ok_or_else(|| {
                err(format!(
                    "{smem_optin} bytes of shared memory per block are too few to sample"
                ))
            })?;
        for name in SAMPLE_KERNELS {
            driver(
                &format!("allowing {name} its shared memory"),
                functions[name].set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    (sample_threads * SAMPLE_SMEM_PER_THREAD) as i32,
                ),
            )?;
        }
        let allocator = Arc::new(Allocator {
            ctx: ctx.clone(),
            stream: stream.clone(),
            free: Mutex::new(HashMap::new()),
        });
        let blas_workspace = allocator.alloc(BLAS_WORKSPACE_BYTES)?;
        // SAFETY: the workspace outlives the handle (both fields of the backend; the handle is dropped first).
        let status = unsafe {
            cublas_sys::cublasSetWorkspace_v2(*blas.handle(), blas_workspace.ptr as *mut _, BLAS_WORKSPACE_BYTES)
        };
        if status != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(err(format!("setting the cuBLAS workspace: {status:?}")));
        }
        let profile_ops = std::env::var("CLEAVE_PROFILE_OPS").as_deref() == Ok("1");
        let graphs_on = std::env::var("CLEAVE_CUDA_GRAPHS").as_deref() != Ok("0") && !profile_ops;
        let graphs = graphs_on.then(|| Mutex::new(HashMap::new()));
        Ok(Self {
            ctx,
            stream,
            blas,
            allocator,
            functions,
            _module: module,
            elem,
            rope_table: Mutex::new(None),
            device_name,
            arch,
            n_sms,
            sample_threads: sample_threads as u32,
            graphs,
            retired_graphs: Mutex::new(Vec::new()),
            scratch_block: std::sync::atomic::AtomicU32::new(u32::MAX),
            block_size: std::sync::atomic::AtomicU32::new(0),
            _blas_workspace: blas_workspace,
            prefill_kernel,
            gemv,
            copy_stream,
            peer_copy_tables: Mutex::new(Vec::new()),
            op_events: profile_ops.then(|| Mutex::new(Vec::new())),
        })
    }

    /// Where op profiling is on, marks the start of op `name` on the compute stream (it ends where the next op
    /// starts).
    fn mark_op(&self, name: impl FnOnce() -> String) {
        let Some(events) = &self.op_events else { return };
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        if let Ok(event) = self.ctx.new_event(flags)
            && event.record(&self.stream).is_ok()
        {
            events.lock().unwrap_or_else(|e| e.into_inner()).push((name(), event));
        }
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn synchronize(&self) -> Result<()> {
        driver("synchronizing the stream", self.stream.synchronize())
    }

    fn f(&self, generic: &str) -> &CudaFunction {
        &self.functions[&format!("{generic}_{}", self.elem.suffix())]
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        match self.allocator.try_alloc(bytes) {
            Ok(buf) => Ok(buf),
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY && self.release_cached() => {
                self.allocator.alloc(bytes)
            }
            Err(e) => Err(out_of_memory(bytes, e)),
        }
    }

    /// The graph bucket and the longest block table of `step` when a decode graph can run it: one row per sequence,
    /// each sampled, at most GRAPH_BATCH_MAX rows, graphs on and a KV cache made.
    fn graph_shape(&self, step: &StepBatch) -> Option<(usize, usize)> {
        let n = step.n_tokens();
        let decode = self.graphs.is_some()
            && n > 0
            && n <= GRAPH_BATCH_MAX
            && self.scratch_block.load(std::sync::atomic::Ordering::Relaxed) != u32::MAX
            && step.logit_rows.len() == n
            && step
                .seqs
                .iter()
                .enumerate()
                .all(|(i, s)| s.q_len == 1 && s.q_start as usize == i);
        let table_len_max = step.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(1);
        decode.then(|| (n.next_power_of_two(), table_len_max))
    }

    /// Starts a step: frees the graphs retired since the last one, and says whether a captured graph can replay
    /// `step` (its bucket is captured with room for its block tables).
    fn start_graph_step(&self, step: &StepBatch) -> bool {
        self.retired_graphs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let (Some(graphs), Some((bucket, table_len_max))) = (&self.graphs, self.graph_shape(step)) else {
            return false;
        };
        let graphs = graphs.lock().unwrap_or_else(|e| e.into_inner());
        graphs
            .get(&bucket)
            .is_some_and(|g| g.inputs.table_stride >= table_len_max)
    }

    /// Replays the graph [`Self::start_graph_step`] found for `step`, after uploading the step's inputs; the logits.
    fn replay_graph(&self, step: &StepBatch) -> Result<CudaTensor> {
        let (Some(graphs), Some((bucket, _))) = (&self.graphs, self.graph_shape(step)) else {
            return Err(err("no decode graph for this step"));
        };
        let graphs = graphs.lock().unwrap_or_else(|e| e.into_inner());
        let g = graphs
            .get(&bucket)
            .ok_or_else(|| err("no decode graph for this step"))?;
        let block_size = self.block_size.load(std::sync::atomic::Ordering::Relaxed);
        let words = g.inputs.host_words(
            step,
            self.scratch_block.load(std::sync::atomic::Ordering::Relaxed),
            block_size,
        );
        // SAFETY: the buffer holds GraphInputs::words(bucket, stride) words, of which these are the first.
        driver("uploading graph inputs", unsafe {
            cudarc::driver::result::memcpy_htod_async(g.inputs.buf.ptr, &words, self.stream.cu_stream())
        })?;
        driver("replaying the decode graph", g.graph.launch())?;
        Ok(g.logits.alias())
    }

    /// For a decode step a graph can run but none replays: drops the bucket's old graph (its block tables grew),
    /// uploads the step's inputs into a buffer the new graph will own, and returns the batch over that buffer.
    /// `None` for other steps.
    fn prepare_graph_capture(&self, step: &StepBatch) -> Result<Option<(CudaBatch, GraphInputs)>> {
        let (Some(graphs), Some((bucket, table_len_max))) = (&self.graphs, self.graph_shape(step)) else {
            return Ok(None);
        };
        graphs.lock().unwrap_or_else(|e| e.into_inner()).remove(&bucket);
        // No more room than the step needs: a graph's stride bounds its contexts, and so sets how many parts its
        // attention splits each context into — room for 16k tokens at batch 64 made 1k-token steps 27% slower (13.2
        // against 10.4 ms on an H100). A longer context is captured again.
        let table_stride = table_len_max.next_power_of_two().max(64);
        let inputs = GraphInputs {
            buf: self.alloc(4 * GraphInputs::words(bucket, table_stride))?,
            bucket,
            table_stride,
        };
        let scratch_block = self.scratch_block.load(std::sync::atomic::Ordering::Relaxed);
        let words = inputs.host_words(
            step,
            scratch_block,
            self.block_size.load(std::sync::atomic::Ordering::Relaxed),
        );
        // SAFETY: the buffer was sized for these words.
        driver("uploading graph inputs", unsafe {
            cudarc::driver::result::memcpy_htod_async(inputs.buf.ptr, &words, self.stream.cu_stream())
        })?;
        Ok(Some((inputs.batch(), inputs)))
    }

    /// Starts capturing what is issued on this rank's stream.
    fn begin_graph_capture(&self) -> Result<()> {
        driver(
            "starting a graph capture",
            self.stream
                .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED),
        )
    }

    /// Ends the capture begun by [`Self::begin_graph_capture`]; keeps the graph for its bucket if the captured
    /// forward pass succeeded (else the bucket keeps running op by op and is captured again later).
    fn end_graph_capture(&self, inputs: GraphInputs, captured: Result<CudaTensor>) {
        let graph = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        let bucket = inputs.bucket;
        match (captured, graph, &self.graphs) {
            (Ok(logits), Ok(Some(graph)), Some(graphs)) => {
                let g = DecodeGraph { graph, inputs, logits };
                graphs.lock().unwrap_or_else(|e| e.into_inner()).insert(bucket, g);
            }
            (captured, graph, _) => tracing::warn!(
                bucket,
                "capturing a decode graph failed ({:?}, {:?}); this bucket runs op by op",
                captured.err(),
                graph.err()
            ),
        }
    }

    /// Returns the allocator's cached buffers to the driver, so that memory held for one step shape serves another.
    /// Captured decode graphs use cached buffers (their intermediates), so they are retired first — kept, never
    /// launched again, until the next step starts, because the caller may still read the last replay's logits —
    /// and captured again when next needed. Not possible in the middle of a capture or replay (returns false).
    fn release_cached(&self) -> bool {
        if let Some(graphs) = &self.graphs {
            let Ok(mut graphs) = graphs.try_lock() else {
                return false;
            };
            self.retired_graphs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(graphs.drain().map(|(_, g)| g));
        }
        self.allocator.release_cached() > 0
    }

    /// Copies `host` to a new device buffer. The caller may free or reuse `host` as soon as this returns (weights are
    /// dropped right after, and `Tp::weight_from` reads the next rank's shard meanwhile): `host` is pageable memory,
    /// which the driver stages before `cuMemcpyHtoDAsync` returns. Pinned host memory would not be staged, and this
    /// would then have to wait for the copy.
    fn upload<T: Copy>(&self, host: &[T]) -> Result<DeviceBuffer> {
        let buf = self.alloc(std::mem::size_of_val(host))?;
        if !host.is_empty() {
            // SAFETY: `buf` holds at least `size_of_val(host)` bytes.
            driver("copying to the GPU", unsafe {
                cudarc::driver::result::memcpy_htod_async(buf.ptr, host, self.stream.cu_stream())
            })?;
        }
        Ok(buf)
    }

    /// Copies `n` elements of type T from the device.
    fn download<T: Copy + Default>(&self, ptr: u64, n: usize) -> Result<Vec<T>> {
        let mut host = vec![T::default(); n];
        // SAFETY: the caller passes a device range of at least n elements.
        driver("copying from the GPU", unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host, ptr, self.stream.cu_stream())
        })?;
        self.synchronize()?;
        Ok(host)
    }

    /// Launches `f` and panics with the kernel's name on a launch failure, which only an invalid configuration (a bug)
    /// or a lost device produces.
    fn launch(&self, name: &str, f: &CudaFunction, cfg: LaunchConfig, args: &[&u64], scalars: &[Scalar]) {
        self.launch_on(&self.stream, name, f, cfg, args, scalars)
    }

    fn launch_on(
        &self,
        stream: &CudaStream,
        name: &str,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: &[&u64],
        scalars: &[Scalar],
    ) {
        if std::ptr::eq(stream, &*self.stream) {
            self.mark_op(|| name.to_string());
        }
        let mut builder = stream.launch_builder(f);
        for a in args {
            builder.arg(*a);
        }
        for s in scalars {
            match s {
                Scalar::U32(v) => builder.arg(v),
                Scalar::U64(v) => builder.arg(v),
                Scalar::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: argument lists match the kernels' signatures in kernels.cu (checked by the GPU selftest).
        if let Err(e) = unsafe { builder.launch(cfg) } {
            panic!("CUDA kernel {name} failed to launch: {e}");
        }
    }

    fn grid_stride(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// out(m, n) = x(m, k) · w(n, k)ᵀ on cuBLAS.
    fn gemm_cublas(&self, out: &mut CudaTensor, x: &CudaTensor, w: &CudaWeight) {
        let (m, n, k) = (x.rows as i32, w.rows as i32, x.cols as i32);
        // Row-major out(m, n) = x(m, k) · w(n, k)ᵀ is column-major outᵀ(n, m) = w(k, n)ᵀ · xᵀ(k, m).
        let (alpha, beta) = (1f32, 0f32);
        let t = self.elem.cuda_type();
        self.mark_op(|| format!("gemm {n}x{k}"));
        // SAFETY: pointers and leading dimensions describe the buffers' shapes (x.cols == w.cols: callers check).
        let r = unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                &alpha as *const f32 as *const _,
                w.buf.ptr as *const _,
                t,
                k,
                x.buf.ptr as *const _,
                t,
                k,
                &beta as *const f32 as *const _,
                out.buf.ptr as *mut _,
                t,
                n,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = r {
            panic!("cuBLAS GEMM ({m}×{n}×{k}) failed: {e}");
        }
    }

    /// Whether `gemv` computes an `m`-row product with `k` columns: bf16, m ≤ GEMV_M_MAX, 16-byte rows.
    fn gemv_fits(&self, m: usize, k: usize) -> bool {
        self.elem == Elem::BF16 && (1..=GEMV_M_MAX).contains(&m) && k.is_multiple_of(8)
    }

    /// out(m, n) = x(m, k) · w(n, k)ᵀ on the `gemv_m*` kernels (see `gemv_fits`).
    fn gemv(&self, out: &mut CudaTensor, x: &CudaTensor, w: &CudaWeight) {
        let (m, n, k) = (x.rows, w.rows, x.cols);
        self.mark_op(|| format!("gemv {n}x{k}"));
        let name = format!("gemv_m{m}_bf16");
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(GEMV_ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &name,
            &self.functions[&name],
            cfg,
            &[&out.buf.ptr, &x.buf.ptr, &w.buf.ptr],
            &[Scalar::U32(n as u32), Scalar::U32(k as u32)],
        );
    }

    /// Threads per row of the norm kernels: one per 8 columns where they take 8 at a time, else one per column.
    fn norm_threads(cols: usize) -> u32 {
        let per_thread = if cols.is_multiple_of(8) { 8 } else { 1 };
        1024.min(cols.div_ceil(per_thread).next_multiple_of(32)) as u32
    }

    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Samples row `i` of `logits` as `rows[i]` asks (see [`crate::sampler`]), on the device: the parameters go up,
    /// the token ids come back. Overwrites the logits of the rows' banned ids with NaN.
    pub fn sample_rows(&self, logits: &CudaTensor, rows: &[SampleRow]) -> Result<Vec<u32>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows.len() > logits.rows || logits.cols == 0 || logits.cols > u32::MAX as usize {
            return Err(err(format!(
                "sampling {} rows from logits of shape ({}, {})",
                rows.len(),
                logits.rows,
                logits.cols
            )));
        }
        // Per row 8 words (`SampleParams` in kernels.cu), then every row's banned ids.
        let n_banned: usize = rows.iter().map(|r| r.banned.len()).sum();
        let mut words = Vec::with_capacity(8 * rows.len() + n_banned);
        let mut banned_start = 0u32;
        for r in rows {
            let word = r.word();
            words.extend_from_slice(&[
                word as u32,
                (word >> 32) as u32,
                r.temperature.to_bits(),
                r.top_p.to_bits(),
                r.top_k,
                banned_start,
                r.banned.len() as u32,
                0,
            ]);
            banned_start += r.banned.len() as u32;
        }
        for r in rows {
            words.extend_from_slice(r.banned);
        }
        let inputs = self.upload(&words)?;
        let banned = inputs.ptr + 32 * rows.len() as u64;
        let out = self.alloc(rows.len() * 4)?;
        let name = format!("sample_{}", self.elem.suffix());
        let cfg = LaunchConfig {
            grid_dim: (rows.len() as u32, 1, 1),
            block_dim: (self.sample_threads, 1, 1),
            shared_mem_bytes: self.sample_threads * SAMPLE_SMEM_PER_THREAD as u32,
        };
        self.launch(
            &name,
            &self.functions[&name],
            cfg,
            &[&out.ptr, &logits.buf.ptr, &inputs.ptr, &banned],
            &[
                Scalar::U32(logits.cols as u32),
                Scalar::U32(crate::sampler::weight_shift(logits.cols)),
            ],
        );
        self.download(out.ptr, rows.len())
    }

    /// A `(rows, cols)` tensor of the backend's element type holding `host` (rounded to bf16 in a bf16 backend).
    pub fn upload_tensor(&self, host: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        assert_eq!(
            host.len(),
            rows * cols,
            "upload_tensor: {} values for ({rows}, {cols})",
            host.len()
        );
        let buf = match self.elem {
            Elem::F32 => self.upload(host)?,
            Elem::BF16 => self.upload(&host.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<bf16>>())?,
        };
        Ok(CudaTensor { buf, rows, cols })
    }

    /// Threads per block of the sampling kernel on this device.
    pub fn sample_threads(&self) -> u32 {
        self.sample_threads
    }

    /// Measures device-memory bandwidth with a 16-byte-per-thread copy of `bytes` (read + written), in GB/s.
    pub fn measure_copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let (src, dst) = (self.alloc(bytes)?, self.alloc(bytes)?);
        let n = (bytes / 16) as u64;
        let cfg = LaunchConfig {
            grid_dim: (132 * 16, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.functions["copy_u128"];
        self.launch("copy_u128", f, cfg, &[&dst.ptr, &src.ptr], &[Scalar::U64(n)]);
        self.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            self.launch("copy_u128", f, cfg, &[&dst.ptr, &src.ptr], &[Scalar::U64(n)]);
        }
        self.synchronize()?;
        Ok(2.0 * bytes as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9)
    }

    /// Another engine's KV pool in this process, by its device pointer: when it lives on another GPU, this context
    /// is given peer access to that GPU's context (found from the pointer) so that the copy kernel can store into it.
    fn open_in_process_peer(&self, export: &KvCacheExport) -> Result<PeerKvCache> {
        use cudarc::driver::sys;
        let handle = export.single_handle()?;
        let address: [u8; 8] = handle
            .try_into()
            .map_err(|_| err(format!("an in-process KV handle has 8 bytes, not {}", handle.len())))?;
        let base = u64::from_le_bytes(address);
        driver("bind context", self.ctx.bind_to_thread())?;
        let mut owner: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `owner` receives the context that allocated `base`; an unknown pointer is reported, not read.
        let status = unsafe {
            sys::cuPointerGetAttribute(
                (&mut owner as *mut sys::CUcontext).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
                base,
            )
        };
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(err(format!(
                "the in-process KV pool's address is not GPU memory: {status:?}"
            )));
        }
        if owner != self.ctx.cu_ctx() {
            // SAFETY: both contexts are alive (the peer's pool is); enabling twice is reported and harmless.
            match unsafe { sys::cuCtxEnablePeerAccess(owner, 0) } {
                sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
                other => {
                    return Err(err(format!(
                        "enabling peer access to the in-process KV pool: {other:?}"
                    )));
                }
            }
        }
        Ok(PeerKvCache {
            kind: KvShareKind::InProcess,
            bases: vec![base],
            layer_bytes: export.layer_bytes,
            block_bytes: export.block_bytes,
            n_layers: export.n_layers,
        })
    }

    /// Measures the link to `peer`'s GPU with cuMemcpyPeer of `bytes` from here to there, in GB/s (the ceiling KV
    /// transfer between the two is reported against).
    pub fn measure_peer_copy_bandwidth(&self, peer: &CudaBackend, bytes: usize, reps: usize) -> Result<f64> {
        let (src, dst) = (self.alloc(bytes)?, peer.alloc(bytes)?);
        // Without peer access the driver stages the copy through host memory (~32 GB/s on an NV18 pair); the KV
        // copies go GPU to GPU, and so must their ceiling.
        driver("bind context", self.ctx.bind_to_thread())?;
        // SAFETY: both contexts are alive; enabling twice is reported and harmless.
        match unsafe { cudarc::driver::sys::cuCtxEnablePeerAccess(peer.ctx.cu_ctx(), 0) } {
            cudarc::driver::sys::CUresult::CUDA_SUCCESS
            | cudarc::driver::sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
            other => {
                return Err(err(format!(
                    "enabling peer access to GPU {}: {other:?}",
                    peer.ctx.ordinal()
                )));
            }
        }
        let copy = || {
            // SAFETY: both buffers hold `bytes`; each context owns its buffer.
            let status = unsafe {
                cudarc::driver::sys::cuMemcpyPeerAsync(
                    dst.ptr,
                    peer.ctx.cu_ctx(),
                    src.ptr,
                    self.ctx.cu_ctx(),
                    bytes,
                    self.stream.cu_stream(),
                )
            };
            match status {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(()),
                other => Err(err(format!("cuMemcpyPeerAsync: {other:?}"))),
            }
        };
        copy()?;
        self.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            copy()?;
        }
        self.synchronize()?;
        Ok(bytes as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9)
    }

    /// Measures throughput on an `m × n × k` product in the backend's element type, in TFLOP/s: cuBLAS, or with
    /// `gemv` our GEMV kernel (bf16, m ≤ 8).
    pub fn measure_gemm_tflops(&self, m: usize, n: usize, k: usize, reps: usize, gemv: bool) -> Result<f64> {
        if gemv && !self.gemv_fits(m, k) {
            return Err(err(format!(
                "the GEMV kernel does not compute a {m}×{n}×{k} product in {:?}",
                self.elem
            )));
        }
        let e = self.elem.size();
        let (a, b, c) = (self.alloc(m * k * e)?, self.alloc(n * k * e)?, self.alloc(m * n * e)?);
        let (x, w, mut out) = (
            CudaTensor {
                buf: a,
                rows: m,
                cols: k,
            },
            CudaWeight {
                buf: b,
                rows: n,
                cols: k,
            },
            CudaTensor {
                buf: c,
                rows: m,
                cols: n,
            },
        );
        // Random-ish contents: zeros can run faster than real data.
        let f = &self.functions["copy_u128"];
        for buf in [&x.buf, &w.buf] {
            let cfg = Self::grid_stride(buf.bytes / 16);
            self.launch(
                "copy_u128",
                f,
                cfg,
                &[&buf.ptr, &self.allocator_noise()?.ptr],
                &[Scalar::U64((buf.bytes / 16).min(NOISE_BYTES / 16) as u64)],
            );
        }
        let product = |out: &mut CudaTensor| match gemv {
            true => self.gemv(out, &x, &w),
            false => self.gemm_cublas(out, &x, &w),
        };
        product(&mut out);
        self.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            product(&mut out);
        }
        self.synchronize()?;
        Ok(2.0 * (m * n * k) as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e12)
    }

    /// Checks the GEMV kernels (every m from 1 to GEMV_M_MAX) against an f64 product computed on the host from the
    /// same bf16 inputs, on shapes with a partial last block of rows. Returns (case, ‖out − ref‖ / ‖ref‖). Needs a
    /// bf16 backend.
    pub fn check_gemv(&self, seed: u64) -> Result<Vec<(String, f64)>> {
        if self.elem != Elem::BF16 {
            return Err(err("the GEMV check runs on a bf16 backend"));
        }
        let mut rng = seed | 1;
        let mut bf16_values = |n: usize| -> Vec<u16> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let v = (rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    (v.to_bits() >> 16) as u16
                })
                .collect()
        };
        let to_f64 = |b: u16| f32::from_bits((b as u32) << 16) as f64;
        let mut results = Vec::new();
        for (n, k) in [(1001, 4096), (300, 14336)] {
            let w_host = bf16_values(n * k);
            let w = CudaWeight {
                buf: self.upload(&w_host)?,
                rows: n,
                cols: k,
            };
            for m in 1..=GEMV_M_MAX {
                let x_host = bf16_values(m * k);
                let x = CudaTensor {
                    buf: self.upload(&x_host)?,
                    rows: m,
                    cols: k,
                };
                let mut out = CudaTensor {
                    buf: self.upload(&vec![0xffffu16; m * n])?,
                    rows: m,
                    cols: n,
                };
                self.gemv(&mut out, &x, &w);
                let got = self.to_host(&out)?;
                let (mut diff2, mut ref2) = (0f64, 0f64);
                for i in 0..m {
                    for j in 0..n {
                        let r: f64 = (0..k)
                            .map(|c| to_f64(x_host[i * k + c]) * to_f64(w_host[j * k + c]))
                            .sum();
                        let g = got[i * n + j] as f64;
                        diff2 += if g.is_finite() {
                            (g - r) * (g - r)
                        } else {
                            f64::INFINITY
                        };
                        ref2 += r * r;
                    }
                }
                results.push((format!("{m}x{n}x{k}"), (diff2 / ref2).sqrt()));
            }
        }
        Ok(results)
    }

    /// Attention of a step's rows with the given prefill kernel where the shape and dtype allow it: the `Flash2`
    /// kernels (bf16, head_dim 128) fall back to `Wmma` (bf16, head_dim ≤ 128 and block_size multiples of 16), and
    /// that to the flash-decoding kernels, which run every other case and all decode steps.
    #[allow(clippy::too_many_arguments)] // the Backend::attention arguments plus the kernel choice
    fn attention_with(
        &self,
        prefill_kernel: PrefillKernel,
        out: &mut CudaTensor,
        q: &CudaTensor,
        cache: &CudaKvCache,
        layer_idx: usize,
        shape: AttentionShape,
        batch: &CudaBatch,
    ) {
        assert!(
            shape.head_dim <= 256,
            "the CUDA attention kernel supports head_dim up to 256"
        );
        let layer = cache.layer_ptr(layer_idx);
        // Prefill in bf16 runs on tensor cores; decode (one row per sequence) on the flash-decoding kernels below.
        let prefill = self.elem == Elem::BF16 && batch.q_len_max >= 16;
        let group = shape.n_heads / shape.n_kv_heads;
        // Heads of one kv group per block: the most of 8, 4, 2, 1 that divides the group.
        let heads_per_block = FA2_HEADS_PER_BLOCK
            .into_iter()
            .rev()
            .find(|hg| group.is_multiple_of(*hg))
            .unwrap_or(1);
        let tile_list = TILE_ROWS
            .iter()
            .position(|&rows| rows as usize == 128 / heads_per_block)
            .expect("a tile list for every heads_per_block");
        let shared_q = prefill_kernel == PrefillKernel::Flash2SharedQ;
        if prefill
            && (prefill_kernel == PrefillKernel::Flash2 || shared_q)
            && shape.head_dim == 128
            && shape.n_heads.is_multiple_of(shape.n_kv_heads)
        {
            let n_tiles = batch.n_prefill_tiles[tile_list];
            assert!(n_tiles <= 65_535, "{n_tiles} query tiles exceed the grid's y limit");
            let (name, smem_bytes) = if shared_q {
                (flash2q_name(heads_per_block), FA2Q_SMEM_BYTES)
            } else {
                (flash2_name(heads_per_block), FA2_SMEM_BYTES)
            };
            let cfg = LaunchConfig {
                grid_dim: ((shape.n_heads / heads_per_block) as u32, n_tiles as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem_bytes as u32,
            };
            self.launch(
                &name,
                &self.functions[&name],
                cfg,
                &[
                    &out.buf.ptr,
                    &q.buf.ptr,
                    &layer,
                    &batch.prefill_tiles[tile_list],
                    &batch.seq_meta,
                    &batch.block_tables,
                ],
                &[
                    Scalar::U32(n_tiles as u32),
                    Scalar::U32(shape.n_heads as u32),
                    Scalar::U32(shape.n_kv_heads as u32),
                    Scalar::U32(cache.layout.block_size as u32),
                    Scalar::F32(shape.scale * std::f32::consts::LOG2_E),
                ],
            );
            return;
        }
        if prefill
            && prefill_kernel != PrefillKernel::Decode
            && shape.head_dim.is_multiple_of(16)
            && shape.head_dim <= 128
            && cache.layout.block_size.is_multiple_of(16)
        {
            let cfg = LaunchConfig {
                grid_dim: (batch.n_prefill_tiles[WMMA_TILE_LIST] as u32, shape.n_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                "flash_prefill_bf16",
                &self.functions["flash_prefill_bf16"],
                cfg,
                &[
                    &out.buf.ptr,
                    &q.buf.ptr,
                    &layer,
                    &batch.prefill_tiles[WMMA_TILE_LIST],
                    &batch.seq_meta,
                    &batch.block_tables,
                ],
                &[
                    Scalar::U32(shape.n_heads as u32),
                    Scalar::U32(shape.n_kv_heads as u32),
                    Scalar::U32(shape.head_dim as u32),
                    Scalar::U32(cache.layout.block_size as u32),
                    Scalar::F32(shape.scale),
                ],
            );
            return;
        }
        // Query heads sharing a kv head run in one block, reading K and V once (head_dim up to 128, in vector loads
        // of 8 elements).
        let gqa = shape.head_dim <= 128 && shape.head_dim.is_multiple_of(8) && (1..=8).contains(&group);
        let (kernel, blocks_y) = if gqa {
            (format!("attention_gqa{group}"), shape.n_kv_heads)
        } else {
            ("attention".into(), shape.n_heads)
        };
        // Few blocks — decode — would leave most SMs idle: split each context across blocks (flash-decoding) so
        // that about two blocks per SM run, and merge the splits after. Long contexts are split further, at most
        // ATTENTION_SPLIT_TOKENS per block: otherwise one block walks a whole 32k-token context while the rest of
        // the GPU waits. A graph's batch bounds the context by its table stride, so a longer context recaptures.
        let pairs = batch.n_tokens * shape.n_heads;
        let context_max = batch.table_blocks_max * cache.layout.block_size;
        let n_splits = (2 * self.n_sms)
            .div_ceil(batch.n_tokens * blocks_y)
            .max(context_max.div_ceil(ATTENTION_SPLIT_TOKENS))
            .clamp(1, 32);
        let partial = (n_splits > 1).then(|| {
            self.alloc(pairs * n_splits * (shape.head_dim + 2) * 4)
                .expect("allocating attention partials")
        });
        let partial_ptr = partial.as_ref().map_or(0, |p| p.ptr);
        let cfg = LaunchConfig {
            grid_dim: (batch.n_tokens as u32, blocks_y as u32, n_splits as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = [
            Scalar::U32(shape.n_heads as u32),
            Scalar::U32(shape.n_kv_heads as u32),
            Scalar::U32(shape.head_dim as u32),
            Scalar::U32(cache.layout.block_size as u32),
            Scalar::F32(shape.scale),
        ];
        self.launch(
            &kernel,
            self.f(&kernel),
            cfg,
            &[
                &out.buf.ptr,
                &partial_ptr,
                &q.buf.ptr,
                &layer,
                &batch.seq_of_row,
                &batch.seq_meta,
                &batch.block_tables,
            ],
            &dims,
        );
        if n_splits > 1 {
            let cfg = LaunchConfig {
                grid_dim: (batch.n_tokens as u32, shape.n_heads as u32, 1),
                block_dim: (shape.head_dim.next_multiple_of(32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                "attention_merge",
                self.f("attention_merge"),
                cfg,
                &[&out.buf.ptr, &partial_ptr],
                &[
                    Scalar::U32(shape.n_heads as u32),
                    Scalar::U32(shape.head_dim as u32),
                    Scalar::U32(n_splits as u32),
                ],
            );
        }
    }

    /// Checks the prefill attention kernels against an f64 reference computed on the host from the same bf16
    /// inputs: random Q, K and V (block_size 16, 32 and 48, shuffled block tables), several sequences per batch,
    /// some with a cached prefix and one with a single new row; grouped-query shapes that use every
    /// `flash2_prefill_hd128_g*` instantiation. Each kernel's output is poisoned with NaN first. Uses the KV pool of
    /// the backend it runs on: call it on a backend of its own, not one an engine is using.
    pub fn check_prefill_attention(&self, seed: u64) -> Result<Vec<AttentionCheck>> {
        if self.elem != Elem::BF16 {
            return Err(err("the prefill attention check runs on a bf16 backend"));
        }
        let cases: [AttentionCase; 4] = [
            (
                "32q/8kv bs16",
                32,
                8,
                16,
                &[(0, 200), (77, 150), (39, 1), (300, 17), (5, 64)],
            ),
            ("4q/4kv bs32", 4, 4, 32, &[(0, 300), (130, 129)]),
            ("16q/2kv bs48", 16, 2, 48, &[(0, 100), (17, 33)]),
            ("8q/4kv bs16", 8, 4, 16, &[(10, 90), (0, 16)]),
        ];
        let mut rng = seed | 1;
        let mut results = Vec::new();
        for (name, n_heads, n_kv_heads, block_size, seqs) in cases {
            let head_dim = 128;
            let setup = AttentionSetup::new(self, &mut rng, n_heads, n_kv_heads, block_size, seqs)?;
            let reference = setup.reference();
            for kernel in [
                PrefillKernel::Flash2,
                PrefillKernel::Flash2SharedQ,
                PrefillKernel::Wmma,
                PrefillKernel::Decode,
            ] {
                let mut out = CudaTensor {
                    buf: self.upload(&vec![0xffffu16; setup.n_tokens * n_heads * head_dim])?,
                    rows: setup.n_tokens,
                    cols: n_heads * head_dim,
                };
                self.attention_with(kernel, &mut out, &setup.q, &setup.cache, 0, setup.shape, &setup.batch);
                let got = self.to_host(&out)?;
                let (mut diff2, mut ref2, mut max_abs_err, mut non_finite) = (0f64, 0f64, 0f64, 0usize);
                for (&g, &r) in got.iter().zip(&reference) {
                    if !g.is_finite() {
                        non_finite += 1;
                        continue;
                    }
                    let d = g as f64 - r;
                    diff2 += d * d;
                    ref2 += r * r;
                    max_abs_err = max_abs_err.max(d.abs());
                }
                results.push(AttentionCheck {
                    case: name.to_string(),
                    kernel,
                    rel_err: (diff2 / ref2).sqrt(),
                    max_abs_err,
                    non_finite,
                });
            }
        }
        Ok(results)
    }

    /// Times `kernels` on one sequence of `n_tokens` new tokens (causal, no cached prefix, block_size 16, random
    /// data): the median of `reps` launches after a warm-up, each timed between stream synchronisations.
    pub fn time_prefill_attention(
        &self,
        n_tokens: u32,
        n_heads: usize,
        n_kv_heads: usize,
        kernels: &[PrefillKernel],
        reps: usize,
    ) -> Result<Vec<AttentionTiming>> {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ n_tokens as u64;
        let setup = AttentionSetup::new(self, &mut rng, n_heads, n_kv_heads, 16, &[(0, n_tokens)])?;
        let mut out = self.tensor(setup.n_tokens, n_heads * 128)?;
        let flops = 4.0 * 128.0 * n_heads as f64 * n_tokens as f64 * (n_tokens as f64 + 1.0) / 2.0;
        let mut timings = Vec::new();
        for &kernel in kernels {
            let mut times = Vec::new();
            for rep in 0..=reps.max(1) {
                self.synchronize()?;
                let start = std::time::Instant::now();
                self.attention_with(kernel, &mut out, &setup.q, &setup.cache, 0, setup.shape, &setup.batch);
                self.synchronize()?;
                if rep > 0 {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let s = times[times.len() / 2];
            timings.push(AttentionTiming {
                kernel,
                n_tokens: n_tokens as usize,
                ms: s * 1e3,
                tflops: flops / s / 1e12,
            });
        }
        Ok(timings)
    }

    fn allocator_noise(&self) -> Result<DeviceBuffer> {
        let noise: Vec<u16> = (0..NOISE_BYTES / 2)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5).to_bits())
            .collect();
        self.upload(&noise)
    }
}

const NOISE_BYTES: usize = 1 << 20;

/// One kernel on one case of [`CudaBackend::check_prefill_attention`], against the f64 reference.
#[derive(Clone, Debug)]
pub struct AttentionCheck {
    pub case: String,
    pub kernel: PrefillKernel,
    /// ‖out − ref‖ / ‖ref‖ over every row and head of the batch.
    pub rel_err: f64,
    pub max_abs_err: f64,
    /// Output elements not finite: left unwritten (the output is poisoned with NaN) or computed as inf/NaN.
    pub non_finite: usize,
}

/// One kernel's time in [`CudaBackend::time_prefill_attention`]; FLOPs = 4 · head_dim · n_heads · n(n+1)/2.
#[derive(Clone, Debug)]
pub struct AttentionTiming {
    pub kernel: PrefillKernel,
    pub n_tokens: usize,
    pub ms: f64,
    pub tflops: f64,
}

/// A batch for the attention check: name, n_heads, n_kv_heads, block_size, (cached, new) tokens of each sequence.
type AttentionCase = (&'static str, usize, usize, usize, &'static [(u32, u32)]);

/// Random attention inputs for one layer (head_dim 128, bf16) on the device, with the host copies the reference
/// reads.
struct AttentionSetup {
    shape: AttentionShape,
    block_size: usize,
    n_tokens: usize,
    seqs: Vec<SeqSlice>,
    q_host: Vec<bf16>,
    kv_host: Vec<bf16>,
    q: CudaTensor,
    cache: CudaKvCache,
    batch: CudaBatch,
}

/// xorshift64*: uniform in [-1, 1).
fn next_uniform(state: &mut u64) -> f32 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
    bits as f32 / (1u64 << 23) as f32 - 1.0
}

impl AttentionSetup {
    fn new(
        backend: &CudaBackend,
        rng: &mut u64,
        n_heads: usize,
        n_kv_heads: usize,
        block_size: usize,
        seqs: &[(u32, u32)],
    ) -> Result<Self> {
        let head_dim = 128;
        let n_blocks_used: usize = seqs
            .iter()
            .map(|&(cached, new)| ((cached + new) as usize).div_ceil(block_size))
            .sum();
        let layout = KvLayout {
            n_layers: 1,
            n_blocks: n_blocks_used + 3,
            block_size,
            n_kv_heads,
            head_dim,
        };
        let cache = backend.kv_cache(&layout)?;
        // Blocks in shuffled order, so that a wrong table lookup reads the wrong data.
        let mut order: Vec<u32> = (0..layout.n_blocks as u32).collect();
        for i in (1..order.len()).rev() {
            let j = ((next_uniform(rng) + 1.0) / 2.0 * (i + 1) as f32) as usize;
            order.swap(i, j.min(i));
        }
        // Values in [-2, 2): scores with a standard deviation of about 1.3 after scaling, a peaked softmax.
        let mut random = |n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(2.0 * next_uniform(rng))).collect() };
        let kv_host = random(cache.layer_bytes / 2);
        driver("uploading the KV cache", unsafe {
            // SAFETY: the layer holds layer_bytes bytes.
            cudarc::driver::result::memcpy_htod_async(cache.pool.ptr, &kv_host, backend.stream.cu_stream())
        })?;
        let mut step = StepBatch::default();
        let mut next_block = 0;
        for &(cached, new) in seqs {
            let context_len = cached + new;
            let n = (context_len as usize).div_ceil(block_size);
            step.seqs.push(SeqSlice {
                q_start: step.token_ids.len() as u32,
                q_len: new,
                context_len,
                block_table: order[next_block..next_block + n].to_vec(),
            });
            next_block += n;
            for pos in cached..context_len {
                step.token_ids.push(0);
                step.positions.push(pos);
                step.slots.push(0);
            }
        }
        let n_tokens = step.token_ids.len();
        let q_host = random(n_tokens * n_heads * head_dim);
        let q = CudaTensor {
            buf: backend.upload(&q_host)?,
            rows: n_tokens,
            cols: n_heads * head_dim,
        };
        let batch = backend.batch(&step)?;
        Ok(Self {
            shape: AttentionShape {
                n_heads,
                n_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
            block_size,
            n_tokens,
            seqs: step.seqs,
            q_host,
            kv_host,
            q,
            cache,
            batch,
        })
    }

    /// Causal attention of every new row in f64, laid out as the kernels' output ([n_tokens][n_heads][head_dim]).
    fn reference(&self) -> Vec<f64> {
        let (n_heads, hd) = (self.shape.n_heads, self.shape.head_dim);
        let kv_dim = self.shape.n_kv_heads * hd;
        let bs = self.block_size;
        let group = n_heads / self.shape.n_kv_heads;
        let mut out = vec![0f64; self.n_tokens * n_heads * hd];
        for seq in &self.seqs {
            let cached = seq.context_len - seq.q_len;
            let row_of = |pos: usize, kv_head: usize, v: bool| {
                let block = seq.block_table[pos / bs] as usize;
                block * 2 * bs * kv_dim + (pos % bs + if v { bs } else { 0 }) * kv_dim + kv_head * hd
            };
            for i in 0..seq.q_len as usize {
                let row = seq.q_start as usize + i;
                let pos = cached as usize + i;
                for h in 0..n_heads {
                    let kv_head = h / group;
                    let q = &self.q_host[(row * n_heads + h) * hd..][..hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|t| {
                            let k = &self.kv_host[row_of(t, kv_head, false)..][..hd];
                            let dot: f64 = q.iter().zip(k).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                            dot * self.shape.scale as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = weights.iter().sum();
                    let o = &mut out[(row * n_heads + h) * hd..][..hd];
                    for (t, w) in weights.iter().enumerate() {
                        let v = &self.kv_host[row_of(t, kv_head, true)..][..hd];
                        for (od, vd) in o.iter_mut().zip(v) {
                            *od += w / sum * vd.to_f64();
                        }
                    }
                }
            }
        }
        out
    }
}

const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Largest decode batch run as a CUDA graph; larger ones run op by op (launch overhead matters less there).
const GRAPH_BATCH_MAX: usize = 256;

/// Query rows per tile of the prefill kernels: `flash2_prefill_hd128_g{hg}_bf16` takes tiles of `128 / hg` rows,
/// `flash_prefill_bf16` tiles of 64 (FA_WARPS × 16 in kernels.cu).
const TILE_ROWS: [u32; 4] = [16, 32, 64, 128];
const WMMA_TILE_LIST: usize = 2;
const _: () = assert!(TILE_ROWS[WMMA_TILE_LIST] == 64);

/// Query heads per block of the `flash2_prefill_hd128_g{hg}_bf16` instantiations (tiles of `128 / hg` rows).
const FA2_HEADS_PER_BLOCK: [usize; 4] = [1, 2, 4, 8];

fn flash2_name(heads_per_block: usize) -> String {
    format!("flash2_prefill_hd128_g{heads_per_block}_bf16")
}

fn flash2q_name(heads_per_block: usize) -> String {
    format!("flash2q_prefill_hd128_g{heads_per_block}_bf16")
}

/// Dynamic shared memory of `flash2_prefill_*`: 2 stages × (K, V) × 64 keys × 128 dims × 2 bytes; the
/// `flash2q_prefill_*` variant adds Q, 128 rows × 128 dims × 2 bytes.
const FA2_SMEM_BYTES: usize = 2 * 2 * 64 * 128 * 2;
const FA2Q_SMEM_BYTES: usize = FA2_SMEM_BYTES + 128 * 128 * 2;

/// Which bf16 products of few rows (decode steps) run on the `gemv_m*` kernels instead of cuBLAS: `CLEAVE_GEMV` =
/// `off` (none), `all` (every m ≤ GEMV_M_MAX), or unset: the measured choice, m ≤ 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvPolicy {
    Measured,
    Off,
    All,
}

impl GemvPolicy {
    fn from_env() -> Result<Self> {
        match std::env::var("CLEAVE_GEMV").as_deref() {
            Err(_) | Ok("") => Ok(Self::Measured),
            Ok("off") => Ok(Self::Off),
            Ok("all") => Ok(Self::All),
            Ok(other) => Err(err(format!("CLEAVE_GEMV={other}: expected off or all"))),
        }
    }

    /// Whether an m-row product runs on our kernel.
    fn covers(self, m: usize) -> bool {
        match self {
            Self::Off => false,
            Self::All => true,
            // H100 SXM, a Llama-3-8B layer's four products (selftest "few-row products"): ours 0.154 / 0.160 /
            // 0.165 ms at m = 1 / 2 / 4 against cuBLAS's 0.163 / 0.164 / 0.164; at m = 8 0.209 against 0.164 (the
            // FMAs grow with m while the bytes do not). Decode steps: docs/benchmarks.md, "GEMV".
            Self::Measured => m <= 4,
        }
    }
}

/// Which kernel runs bf16 prefill attention: `Flash2SharedQ` unless `CLEAVE_PREFILL_ATTENTION` names another
/// (`fa2`, `wmma`, `decode`), for comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// `flash2_prefill_hd128_*`: mma.sync, K/V staged in shared memory, Q, S and O in registers (head_dim 128);
    /// 220 registers per thread, one block of 8 warps per SM.
    Flash2,
    /// `flash2q_prefill_hd128_*`, the default: the same with Q re-read from shared memory each key tile, so that a
    /// thread fits 128 registers and two blocks run per SM (7–8% faster on an H100: docs/benchmarks.md).
    Flash2SharedQ,
    /// `flash_prefill_bf16`: WMMA with K/V fragments from global memory (head_dim ≤ 128, multiple of 16).
    Wmma,
    /// The flash-decoding kernels (`attention_gqa*`, f32 arithmetic on CUDA cores), which handle every shape.
    Decode,
}

enum Scalar {
    U32(u32),
    U64(u64),
    F32(f32),
}

/// Compiles kernels.cu for `arch`, or loads the machine code cached from an earlier run (keyed by source hash and
/// arch). The cache holds a CUBIN, not PTX: a PTX module would be compiled again by the driver at every start.
fn load_kernels(ctx: &Arc<CudaContext>, arch: &str) -> Result<Arc<CudaModule>> {
    let hash = KERNELS_CU.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let cache_dir = std::env::var_os("CLEAVE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("cleave")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/cleave")))
        .unwrap_or_else(|| std::env::temp_dir().join("cleave"))
        .join("kernels");
    let cached = cache_dir.join(format!("{hash:016x}-{arch}.cubin"));
    let started = std::time::Instant::now();
    let cubin = match std::fs::read(&cached) {
        Ok(cubin) => cubin,
        Err(_) => {
            let cubin = compile_cubin(arch)?;
            tracing::info!(
                arch,
                seconds = started.elapsed().as_secs_f64(),
                "compiled kernels.cu with NVRTC"
            );
            // A failed cache write only costs the next start a compile. Written aside and renamed, so that a worker
            // starting beside this one never reads half a file.
            let partial = cached.with_extension(format!("cubin.{}", std::process::id()));
            if std::fs::create_dir_all(&cache_dir).is_ok() && std::fs::write(&partial, &cubin).is_ok() {
                let _ = std::fs::rename(&partial, &cached);
            }
            cubin
        }
    };
    driver(
        "loading the kernels",
        ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)),
    )
}

/// kernels.cu compiled by NVRTC to machine code for `arch` (`sm_XY`).
fn compile_cubin(arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let include = std::env::var("CUDA_HOME")
        .map(|h| format!("{h}/include"))
        .unwrap_or_else(|_| "/usr/local/cuda/include".into());
    if !std::path::Path::new(&include).join("cuda_bf16.h").exists() {
        return Err(err(format!(
            "NVRTC needs the CUDA headers (cuda_bf16.h) and {include} has none; set CUDA_HOME to the CUDA toolkit folder"
        )));
    }
    let failed = |what: &str, e: cudarc::nvrtc::result::NvrtcError| err(format!("NVRTC {what} for {arch}: {e}"));
    let source = std::ffi::CString::new(KERNELS_CU).map_err(|_| err("kernels.cu holds a NUL byte".to_string()))?;
    let program = result::create_program(&source, None).map_err(|e| failed("create", e))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        format!("--include-path={include}"),
        "--std=c++17".to_string(),
    ];
    // SAFETY: `program` was just created and is destroyed once, below.
    let compiled = unsafe { result::compile_program(program, &options) };
    let out = match compiled {
        Err(e) => {
            // SAFETY: as above.
            let log = unsafe { result::get_program_log(program) }
                .map(|log| log.iter().map(|&c| c as u8 as char).collect::<String>())
                .unwrap_or_default();
            Err(err(format!(
                "compiling kernels.cu for {arch} with NVRTC failed: {e}\n{}",
                log.trim_end_matches('\0')
            )))
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: the program compiled; the buffer is sized by NVRTC's own answer.
            unsafe { sys::nvrtcGetCUBINSize(program, &mut size).result() }
                .map_err(|e| failed("CUBIN size", e))
                .and_then(|()| {
                    let mut cubin = vec![0u8; size];
                    unsafe { sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast()).result() }
                        .map(|()| cubin)
                        .map_err(|e| failed("CUBIN", e))
                })
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(program) };
    out
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Batch = CudaBatch;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn weight(&self, tensor: HostTensor) -> Result<CudaWeight> {
        let (rows, cols) = match tensor.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => return Err(err(format!("weights must be 1-D or 2-D, got shape {other:?}"))),
        };
        let buf = match (self.elem, tensor.data) {
            (Elem::F32, HostData::F32(v)) => self.upload(&v)?,
            (Elem::F32, HostData::BF16(v)) => self.upload(&v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>())?,
            (Elem::BF16, HostData::BF16(v)) => self.upload(&v)?,
            (Elem::BF16, HostData::F32(v)) => {
                self.upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<bf16>>())?
            }
        };
        Ok(CudaWeight { buf, rows, cols })
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<CudaKvCache> {
        // One block past the engine's: padding rows of graph-captured decode steps write their K and V there.
        let layer_bytes = (layout.n_blocks + 1) * self.kv_block_bytes(layout);
        self.scratch_block
            .store(layout.n_blocks as u32, std::sync::atomic::Ordering::Relaxed);
        self.block_size
            .store(layout.block_size as u32, std::sync::atomic::Ordering::Relaxed);
        let pool = self.alloc(layer_bytes * layout.n_layers)?;
        // Zeroed so that a bug reading an unwritten slot shows as zeros, not as another request's data.
        driver("zeroing the KV pool", unsafe {
            cudarc::driver::result::memset_d8_async(pool.ptr, 0, pool.bytes, self.stream.cu_stream())
        })?;
        Ok(CudaKvCache {
            pool,
            layout: *layout,
            layer_bytes,
        })
    }

    fn batch(&self, step: &StepBatch) -> Result<CudaBatch> {
        let mut seq_of_row = vec![0u32; step.n_tokens()];
        let mut seq_meta = Vec::with_capacity(step.seqs.len() * 4);
        let mut block_tables: Vec<u32> = Vec::new();
        // Every tile list in one buffer, list k after list k - 1.
        let mut tiles: Vec<u32> = Vec::new();
        let mut tile_list_starts = [0usize; TILE_ROWS.len()];
        for (k, &rows) in TILE_ROWS.iter().enumerate() {
            tile_list_starts[k] = tiles.len() / 4;
            for (s, seq) in step.seqs.iter().enumerate() {
                for first in (0..seq.q_len).step_by(rows as usize) {
                    tiles.extend([s as u32, seq.q_start + first, (seq.q_len - first).min(rows), 0]);
                }
            }
        }
        for (s, seq) in step.seqs.iter().enumerate() {
            seq_of_row[seq.q_start as usize..(seq.q_start + seq.q_len) as usize].fill(s as u32);
            seq_meta.extend([seq.q_start, seq.q_len, seq.context_len, block_tables.len() as u32]);
            block_tables.extend(&seq.block_table);
        }
        let buffers = vec![
            self.upload(&step.token_ids)?,
            self.upload(&step.positions)?,
            self.upload(&step.slots)?,
            self.upload(&seq_of_row)?,
            self.upload(&seq_meta)?,
            self.upload(&block_tables)?,
            self.upload(&step.logit_rows)?,
            self.upload(&tiles)?,
        ];
        Ok(CudaBatch {
            token_ids: buffers[0].ptr,
            positions: buffers[1].ptr,
            slots: buffers[2].ptr,
            seq_of_row: buffers[3].ptr,
            seq_meta: buffers[4].ptr,
            block_tables: buffers[5].ptr,
            logit_rows: buffers[6].ptr,
            prefill_tiles: tile_list_starts.map(|start| buffers[7].ptr + 16 * start as u64),
            n_prefill_tiles: std::array::from_fn(|k| {
                tile_list_starts.get(k + 1).copied().unwrap_or(tiles.len() / 4) - tile_list_starts[k]
            }),
            q_len_max: step.seqs.iter().map(|s| s.q_len as usize).max().unwrap_or(0),
            table_blocks_max: step.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0),
            n_tokens: step.n_tokens(),
            n_logit_rows: step.logit_rows.len(),
            _buffers: buffers,
        })
    }

    fn batch_tokens(&self, batch: &CudaBatch) -> usize {
        batch.n_tokens
    }

    fn batch_logit_rows(&self, batch: &CudaBatch) -> usize {
        batch.n_logit_rows
    }

    /// A decode step of every graph bucket, its rows one-token sequences in the scratch block.
    fn warm_up_steps(&self) -> Vec<StepBatch> {
        let scratch = self.scratch_block.load(std::sync::atomic::Ordering::Relaxed);
        let block_size = self.block_size.load(std::sync::atomic::Ordering::Relaxed);
        if self.graphs.is_none() || scratch == u32::MAX {
            return Vec::new();
        }
        let buckets = std::iter::successors(Some(1usize), |b| Some(2 * b)).take_while(|&b| b <= GRAPH_BATCH_MAX);
        buckets
            .map(|b| StepBatch {
                token_ids: vec![0; b],
                positions: vec![0; b],
                slots: vec![scratch * block_size; b],
                seqs: (0..b as u32)
                    .map(|i| SeqSlice {
                        q_start: i,
                        q_len: 1,
                        context_len: 1,
                        block_table: vec![scratch],
                    })
                    .collect(),
                logit_rows: (0..b as u32).collect(),
            })
            .collect()
    }

    /// Decode steps of up to GRAPH_BATCH_MAX sequences run as CUDA graphs, one per power-of-two batch bucket: the
    /// first step of a bucket (a warm-up step, see `warm_up_steps`) runs op by op and is captured; later ones upload their inputs and replay it, which
    /// removes the per-kernel launch cost (hundreds of launches per step). `Tp` drives the same pieces on every rank.
    fn run_step(
        &self,
        step: &StepBatch,
        forward: &mut dyn FnMut(&CudaBatch) -> Result<CudaTensor>,
    ) -> Result<CudaTensor> {
        if self.start_graph_step(step) {
            return self.replay_graph(step);
        }
        let Some((batch, capture)) = self.prepare_graph_capture(step)? else {
            return forward(&self.batch(step)?);
        };
        // This step runs for real; its replay is captured for the next steps of the bucket.
        let out = forward(&batch)?;
        self.begin_graph_capture()?;
        let captured = forward(&batch);
        self.end_graph_capture(capture, captured);
        Ok(out)
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            buf: self.alloc(rows * cols * self.elem.size())?,
            rows,
            cols,
        })
    }

    fn embed(&self, out: &mut CudaTensor, table: &CudaWeight, batch: &CudaBatch) {
        let cfg = Self::rows_cfg(batch.n_tokens, 256);
        self.launch(
            "embed",
            self.f("embed"),
            cfg,
            &[&out.buf.ptr, &table.buf.ptr, &batch.token_ids],
            &[Scalar::U32(table.cols as u32)],
        );
    }

    fn rms_norm(&self, out: &mut CudaTensor, x: &CudaTensor, weight: &CudaWeight, eps: f32) {
        let cfg = Self::rows_cfg(x.rows, Self::norm_threads(x.cols));
        self.launch(
            "rms_norm",
            self.f("rms_norm"),
            cfg,
            &[&out.buf.ptr, &x.buf.ptr, &weight.buf.ptr],
            &[Scalar::F32(eps), Scalar::U32(x.cols as u32)],
        );
    }

    fn add_rms_norm(&self, x: &mut CudaTensor, y: &CudaTensor, weight: &CudaWeight, eps: f32, out: &mut CudaTensor) {
        let cfg = Self::rows_cfg(x.rows, Self::norm_threads(x.cols));
        self.launch(
            "add_rms_norm",
            self.f("add_rms_norm"),
            cfg,
            &[&x.buf.ptr, &y.buf.ptr, &weight.buf.ptr, &out.buf.ptr],
            &[Scalar::F32(eps), Scalar::U32(x.cols as u32)],
        );
    }

    fn linear(&self, out: &mut CudaTensor, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaWeight>) {
        assert_eq!(
            x.cols, w.cols,
            "linear: x has {} columns, weight expects {}",
            x.cols, w.cols
        );
        if self.gemv.covers(x.rows) && self.gemv_fits(x.rows, x.cols) {
            self.gemv(out, x, w);
        } else {
            self.gemm_cublas(out, x, w);
        }
        if let Some(b) = bias {
            let total = out.rows * out.cols;
            self.launch(
                "add_bias",
                self.f("add_bias"),
                Self::grid_stride(total),
                &[&out.buf.ptr, &b.buf.ptr],
                &[Scalar::U64(total as u64), Scalar::U32(out.cols as u32)],
            );
        }
    }

    fn qkv_rope_kv(
        &self,
        q: &mut CudaTensor,
        qkv: &CudaTensor,
        cache: &mut CudaKvCache,
        layer_idx: usize,
        rope: &Rope,
        qk_norm: Option<(&CudaWeight, &CudaWeight, f32)>,
        shape: AttentionShape,
        batch: &CudaBatch,
    ) {
        let mut table = self.rope_table.lock().unwrap_or_else(|e| e.into_inner());
        if table.as_ref().is_none_or(|(host, _)| host != &rope.inv_freq) {
            let buf = self.upload(&rope.inv_freq).expect("uploading the RoPE table");
            *table = Some((rope.inv_freq.clone(), buf));
        }
        let freq = &table.as_ref().expect("set above").1;
        let layer = cache.layer_ptr(layer_idx);
        let (q_norm, k_norm, eps) = qk_norm.map_or((0, 0, 0.0), |(qn, kn, eps)| (qn.buf.ptr, kn.buf.ptr, eps));
        // One warp per head: 4 heads per block of 128 threads.
        let cfg = LaunchConfig {
            grid_dim: (
                batch.n_tokens as u32,
                (shape.n_heads + 2 * shape.n_kv_heads).div_ceil(4) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "qkv_rope_kv",
            self.f("qkv_rope_kv"),
            cfg,
            &[
                &q.buf.ptr,
                &qkv.buf.ptr,
                &layer,
                &batch.positions,
                &batch.slots,
                &freq.ptr,
                &q_norm,
                &k_norm,
            ],
            &[
                Scalar::F32(eps),
                Scalar::U32(shape.n_heads as u32),
                Scalar::U32(shape.n_kv_heads as u32),
                Scalar::U32(shape.head_dim as u32),
                Scalar::U32(cache.layout.block_size as u32),
            ],
        );
    }

    fn attention(
        &self,
        out: &mut CudaTensor,
        q: &CudaTensor,
        cache: &CudaKvCache,
        layer_idx: usize,
        shape: AttentionShape,
        batch: &CudaBatch,
    ) {
        self.attention_with(self.prefill_kernel, out, q, cache, layer_idx, shape, batch);
    }

    fn silu_mul(&self, out: &mut CudaTensor, gate_up: &CudaTensor) {
        let n = out.rows * out.cols;
        // The kernel takes 8 elements per thread when the row length allows.
        let per_thread = if out.cols.is_multiple_of(8) { 8 } else { 1 };
        self.launch(
            "silu_mul",
            self.f("silu_mul"),
            Self::grid_stride(n.div_ceil(per_thread)),
            &[&out.buf.ptr, &gate_up.buf.ptr],
            &[Scalar::U32(out.cols as u32), Scalar::U64(n as u64)],
        );
    }

    fn gather_logit_rows(&self, out: &mut CudaTensor, x: &CudaTensor, batch: &CudaBatch) {
        if batch.n_logit_rows == 0 {
            return;
        }
        self.launch(
            "gather_rows",
            self.f("gather_rows"),
            Self::rows_cfg(batch.n_logit_rows, 256),
            &[&out.buf.ptr, &x.buf.ptr, &batch.logit_rows],
            &[Scalar::U32(x.cols as u32)],
        );
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let n = x.rows * x.cols;
        match self.elem {
            Elem::F32 => self.download(x.buf.ptr, n),
            Elem::BF16 => {
                let out = self.alloc(n * 4)?;
                self.launch(
                    "to_float",
                    self.f("to_float"),
                    Self::grid_stride(n),
                    &[&out.ptr, &x.buf.ptr],
                    &[Scalar::U64(n as u64)],
                );
                self.download(out.ptr, n)
            }
        }
    }

    fn kv_block_bytes(&self, layout: &KvLayout) -> usize {
        layout.block_elems() * self.elem.size()
    }

    fn export_kv_block(&self, cache: &CudaKvCache, layer_idx: usize, block: u32, dst: &mut [u8]) -> Result<()> {
        let at = self.block_ptr(cache, layer_idx, block, dst.len())?;
        // SAFETY: range checked by block_ptr.
        driver("copying a KV block from the GPU", unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, at, self.stream.cu_stream())
        })?;
        self.synchronize()
    }

    /// The blocks are gathered on the device into one staging buffer (the peer-copy kernel, staging block `i` =
    /// `blocks[i]`), after the work queued so far, and copied to the host at once.
    fn export_kv_blocks(&self, cache: &CudaKvCache, layer_idx: usize, blocks: &[u32], dst: &mut [u8]) -> Result<()> {
        let block_bytes = self.kv_block_bytes(&cache.layout);
        if dst.len() != blocks.len() * block_bytes {
            return Err(err(format!(
                "{} bytes for {} KV blocks of {block_bytes} bytes",
                dst.len(),
                blocks.len()
            )));
        }
        if let Some(&block) = blocks.iter().find(|&&b| b as usize >= cache.layout.n_blocks) {
            return Err(err(format!(
                "KV block {block} is out of range ({} blocks)",
                cache.layout.n_blocks
            )));
        }
        if layer_idx >= cache.layout.n_layers || blocks.is_empty() {
            return match blocks.is_empty() {
                true => Ok(()),
                false => Err(err(format!("KV layer {layer_idx} of {}", cache.layout.n_layers))),
            };
        }
        let pairs: Vec<u32> = blocks.iter().zip(0u32..).flat_map(|(&src, i)| [src, i]).collect();
        let table = self.upload(&pairs)?;
        let staging = self.alloc(dst.len())?;
        let cfg = LaunchConfig {
            grid_dim: (blocks.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "copy_kv_blocks",
            &self.functions["copy_kv_blocks"],
            cfg,
            &[&staging.ptr, &cache.layer_ptr(layer_idx), &table.ptr],
            &[Scalar::U64(block_bytes as u64 / 16)],
        );
        // SAFETY: `staging` holds dst.len() bytes, written by the kernel queued before on this stream.
        driver("copying KV blocks from the GPU", unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, staging.ptr, self.stream.cu_stream())
        })?;
        // The buffers go back to the allocator only once the copy is done.
        self.synchronize()
    }

    fn import_kv_block(&self, cache: &mut CudaKvCache, layer_idx: usize, block: u32, src: &[u8]) -> Result<()> {
        let at = self.block_ptr(cache, layer_idx, block, src.len())?;
        // SAFETY: range checked by block_ptr.
        driver("copying a KV block to the GPU", unsafe {
            cudarc::driver::result::memcpy_htod_async(at, src, self.stream.cu_stream())
        })?;
        self.synchronize()
    }

    fn sample_tokens(&self, logits: &mut CudaTensor, rows: &[SampleRow]) -> Option<Result<Vec<u32>>> {
        Some(self.sample_rows(logits, rows))
    }

    fn take_op_profile(&self) -> Vec<(String, f64)> {
        let Some(events) = &self.op_events else {
            return Vec::new();
        };
        self.mark_op(|| "end".into());
        let events = std::mem::take(&mut *events.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_name: Vec<(String, f64)> = Vec::new();
        for pair in events.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1).unwrap_or(0.0) as f64;
            match by_name.iter_mut().find(|(name, _)| *name == pair[0].0) {
                Some((_, total)) => *total += ms,
                None => by_name.push((pair[0].0.clone(), ms)),
            }
        }
        by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
        by_name
    }

    fn free_memory_bytes(&self) -> Option<usize> {
        self.ctx.bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info().ok().map(|(free, _)| free)
    }

    fn export_kv_cache(&self, cache: &CudaKvCache) -> Option<KvCacheExport> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().ok()?;
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: the pool is the start of one cuMemAlloc allocation that lives as long as the cache.
        let status = unsafe { sys::cuIpcGetMemHandle(&mut handle, cache.pool.ptr) };
        if status != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!("the KV pool cannot be shared with other processes ({status:?}): KV moves over TCP");
            return None;
        }
        Some(KvCacheExport {
            kind: KvShareKind::CudaIpc,
            handles: vec![handle.reserved.iter().map(|&c| c as u8).collect()],
            layer_bytes: cache.layer_bytes as u64,
            block_bytes: self.kv_block_bytes(&cache.layout) as u64,
            n_layers: cache.layout.n_layers as u32,
        })
    }

    fn export_kv_cache_in_process(&self, cache: &CudaKvCache) -> Option<KvCacheExport> {
        Some(KvCacheExport {
            kind: KvShareKind::InProcess,
            handles: vec![cache.pool.ptr.to_le_bytes().to_vec()],
            layer_bytes: cache.layer_bytes as u64,
            block_bytes: self.kv_block_bytes(&cache.layout) as u64,
            n_layers: cache.layout.n_layers as u32,
        })
    }

    fn open_peer_kv_cache(&self, export: &KvCacheExport) -> Result<PeerKvCache> {
        use cudarc::driver::sys;
        if export.kind == KvShareKind::InProcess {
            return self.open_in_process_peer(export);
        }
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        let bytes = export.single_handle()?;
        if bytes.len() != handle.reserved.len() {
            return Err(err(format!("a CUDA IPC handle has 64 bytes, not {}", bytes.len())));
        }
        for (dst, &src) in handle.reserved.iter_mut().zip(bytes) {
            *dst = src as _;
        }
        driver("bind context", self.ctx.bind_to_thread())?;
        let mut base: CUdeviceptr = 0;
        // Lazy peer access: the peer's pool may live on another GPU of this host (NVLink or PCIe).
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: `handle` came from cuIpcGetMemHandle in the peer process; base receives the mapping.
        let status = unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, handle, flags) };
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(err(format!("opening the peer's KV pool through CUDA IPC: {status:?}")));
        }
        Ok(PeerKvCache {
            kind: KvShareKind::CudaIpc,
            bases: vec![base],
            layer_bytes: export.layer_bytes,
            block_bytes: export.block_bytes,
            n_layers: export.n_layers,
        })
    }

    fn finish_peer_copies(&self) -> Result<()> {
        let done = driver("waiting for KV copies to the peer", self.copy_stream.synchronize());
        self.peer_copy_tables.lock().unwrap_or_else(|e| e.into_inner()).clear();
        done
    }

    fn close_peer_kv_cache(&self, peer: PeerKvCache) {
        let _ = self.synchronize();
        let _ = self.finish_peer_copies();
        if peer.kind == KvShareKind::CudaIpc {
            for &base in &peer.bases {
                // SAFETY: base came from cuIpcOpenMemHandle and no copy into it is pending (synchronised above).
                let _ = unsafe { cudarc::driver::sys::cuIpcCloseMemHandle(base) };
            }
        }
    }

    fn copy_kv_blocks_to_peer(
        &self,
        cache: &CudaKvCache,
        peer: &PeerKvCache,
        layer_idx: usize,
        blocks: &[(u32, u32)],
    ) -> Result<()> {
        let block_bytes = self.kv_block_bytes(&cache.layout) as u64;
        if peer.block_bytes != block_bytes || peer.n_layers as usize != cache.layout.n_layers {
            return Err(err(format!(
                "the peer's KV layout ({} layers of {}-byte blocks) differs from ours ({} of {block_bytes})",
                peer.n_layers, peer.block_bytes, cache.layout.n_layers
            )));
        }
        self.queue_peer_copy(
            cache,
            peer,
            layer_idx,
            blocks,
            "copy_kv_blocks",
            &[Scalar::U64(block_bytes / 16)],
        )
    }

    fn copy_kv_heads_to_peer(
        &self,
        cache: &CudaKvCache,
        peer: &PeerKvCache,
        layer_idx: usize,
        blocks: &[(u32, u32)],
        heads: KvHeadSlice,
    ) -> Result<()> {
        let layout = cache.layout;
        let elem = self.elem.size();
        let head_bytes = layout.head_dim * elem;
        let dst_block_bytes = (2 * layout.block_size * heads.dst_heads * head_bytes) as u64;
        if peer.block_bytes != dst_block_bytes
            || peer.n_layers as usize != layout.n_layers
            || heads.src_head0 + heads.n_heads > layout.n_kv_heads
            || heads.dst_head0 + heads.n_heads > heads.dst_heads
            || !head_bytes.is_multiple_of(16)
        {
            return Err(err(format!(
                "heads {heads:?} of {} ({head_bytes} bytes each) do not fit the peer's KV cache ({} layers of \
                 {}-byte blocks)",
                layout.n_kv_heads, peer.n_layers, peer.block_bytes
            )));
        }
        let words = |n_heads: usize| Scalar::U32((n_heads * head_bytes / 16) as u32);
        self.queue_peer_copy(
            cache,
            peer,
            layer_idx,
            blocks,
            "copy_kv_heads",
            &[
                Scalar::U32(2 * layout.block_size as u32),
                words(layout.n_kv_heads),
                words(heads.dst_heads),
                words(heads.src_head0),
                words(heads.dst_head0),
                words(heads.n_heads),
            ],
        )
    }
}

impl CudaBackend {
    /// Queues `kernel` (`copy_kv_blocks` or `copy_kv_heads`: arguments dst layer, src layer, block pairs, then
    /// `scalars`) over layer `layer_idx`'s `blocks` on the copy stream, after the work queued so far (this layer's K
    /// and V), so the compute stream goes on to the next layer. The caller has checked the peer's block size. The
    /// pair table lives until `finish_peer_copies`.
    fn queue_peer_copy(
        &self,
        cache: &CudaKvCache,
        peer: &PeerKvCache,
        layer_idx: usize,
        blocks: &[(u32, u32)],
        kernel: &str,
        scalars: &[Scalar],
    ) -> Result<()> {
        let peer_blocks = peer.layer_bytes / peer.block_bytes;
        if let Some(&(src, dst)) = blocks
            .iter()
            .find(|&&(src, dst)| src as usize >= cache.layout.n_blocks || dst as u64 >= peer_blocks)
        {
            return Err(err(format!("KV block {src} → peer block {dst} is out of range")));
        }
        if blocks.is_empty() {
            return Ok(());
        }
        let table: Vec<u32> = blocks.iter().flat_map(|&(src, dst)| [src, dst]).collect();
        let table = self.upload(&table)?;
        let src_layer = cache.layer_ptr(layer_idx);
        let dst_layer = peer.single_base()? + layer_idx as u64 * peer.layer_bytes;
        driver(
            "ordering the KV copy after the layer",
            self.copy_stream.join(&self.stream),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (blocks.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch_on(
            &self.copy_stream,
            kernel,
            &self.functions[kernel],
            cfg,
            &[&dst_layer, &src_layer, &table.ptr],
            scalars,
        );
        self.peer_copy_tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(table);
        Ok(())
    }

    fn block_ptr(&self, cache: &CudaKvCache, layer_idx: usize, block: u32, n_bytes: usize) -> Result<u64> {
        let block_bytes = self.kv_block_bytes(&cache.layout);
        if layer_idx >= cache.layout.n_layers || block as usize >= cache.layout.n_blocks || n_bytes != block_bytes {
            return Err(err(format!(
                "KV block access out of range: layer {layer_idx} of {}, block {block} of {}, {n_bytes} bytes (a block is {block_bytes})",
                cache.layout.n_layers, cache.layout.n_blocks
            )));
        }
        Ok(cache.layer_ptr(layer_idx) + (block as usize * block_bytes) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqSlice;

    /// The host side of a captured decode step: padding rows land in the scratch block, tables packed.
    #[test]
    fn graph_inputs_pad_rows_into_the_scratch_block() {
        let step = StepBatch {
            token_ids: vec![11, 12, 13],
            positions: vec![40, 7, 0],
            slots: vec![5 * 16 + 8, 9 * 16 + 7, 3 * 16],
            seqs: vec![
                SeqSlice {
                    q_start: 0,
                    q_len: 1,
                    context_len: 41,
                    block_table: vec![4, 2, 5],
                },
                SeqSlice {
                    q_start: 1,
                    q_len: 1,
                    context_len: 8,
                    block_table: vec![9],
                },
                SeqSlice {
                    q_start: 2,
                    q_len: 1,
                    context_len: 1,
                    block_table: vec![3],
                },
            ],
            logit_rows: vec![0, 1, 2],
        };
        let (bucket, scratch) = (4usize, 100u32);
        let w = graph_input_words(&step, bucket, scratch, 16);
        assert_eq!(
            w.len(),
            9 * 4 + 3 + 1 + 1 + 1,
            "header, three packed tables, one padding entry"
        );
        let b = bucket;
        assert_eq!(&w[0..4], &[0, 1, 41, 0], "seq 0 meta");
        assert_eq!(
            &w[4..8],
            &[1, 1, 8, 3],
            "seq 1 meta: its table after seq 0's three entries"
        );
        assert_eq!(&w[12..16], &[3, 1, 1, 5], "padding row is a one-token sequence");
        assert_eq!(&w[4 * b..5 * b], &[11, 12, 13, 0], "token ids");
        assert_eq!(&w[5 * b..6 * b], &[40, 7, 0, 0], "positions");
        assert_eq!(
            w[6 * b + 3],
            scratch * 16,
            "padding writes its KV into the scratch block"
        );
        assert_eq!(
            &w[9 * b..],
            &[4, 2, 5, 9, 3, scratch],
            "packed tables, then the padding rows' one entry"
        );
        let full = StepBatch {
            seqs: step.seqs[..2].to_vec(),
            token_ids: vec![11, 12],
            positions: vec![40, 7],
            slots: step.slots[..2].to_vec(),
            logit_rows: vec![0, 1],
        };
        let w = graph_input_words(&full, 2, scratch, 16);
        assert_eq!(&w[9 * 2..], &[4, 2, 5, 9], "a full bucket has no padding entry");
    }

    #[test]
    fn size_classes_bound_waste_and_merge_nearby_sizes() {
        for bytes in [
            1,
            255,
            256,
            4097,
            1 << 20,
            (1 << 20) + 1,
            77 << 20,
            235 << 20,
            (1 << 30) - 1,
            53 << 30,
        ] {
            let class = super::size_class(bytes);
            assert!(class >= bytes, "{bytes} → {class}");
            assert!(
                bytes <= 1 << 20 || class - bytes <= bytes / 16,
                "{bytes} → {class} wastes too much"
            );
        }
        // Two steps a few tokens apart share a class; the KV pool stays exact.
        assert_eq!(super::size_class(4096 * 510 * 2), super::size_class(4096 * 500 * 2));
        assert_eq!(super::size_class((53 << 30) + 256), (53 << 30) + 256);
    }
}
