//! CUDA ranks of a [`Tp`]: one [`CudaBackend`] per GPU, summed with NCCL all-reduce.
//!
//! One process drives every GPU of the worker from the engine's thread, so the communicators are made together with
//! `ncclCommInitAll` and each all-reduce is issued for every rank between `ncclGroupStart` and `ncclGroupEnd` (without
//! the group, the first rank's call would wait for the others, which this thread has not issued yet). Each rank's
//! all-reduce runs on that rank's stream, ordered after the o_proj or down_proj product that fed it.
//!
//! Decode steps run as CUDA graphs as at one rank, one graph per rank (`CLEAVE_TP_GRAPHS=0` turns them off):
//! `Tp::run_step` replays on every rank or captures on every rank, the NCCL all-reduces captured with the kernels
//! around them, and launches each rank's replay from a thread of its own (NCCL documents that graphs with collectives
//! launched for several GPUs from one thread can deadlock).

use cudarc::nccl::{result as nccl, sys as nccl_sys};

use super::{CudaBackend, CudaBatch, CudaTensor, Elem, err};
use crate::backend::StepBatch;
use crate::backend::tensor_parallel::{RankBackend, Tp};
use crate::config::ModelConfig;
use crate::error::Result;

/// One NCCL communicator per rank, in rank order.
pub struct NcclGroup {
    comms: Vec<nccl_sys::ncclComm_t>,
}

// SAFETY: the communicators are used from one thread at a time (the engine's, like the backends they serve).
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        for &comm in &self.comms {
            // SAFETY: made by ncclCommInitAll, destroyed once; no operation is in flight once the engine is dropped.
            let _ = unsafe { nccl::comm_destroy(comm) };
        }
    }
}

/// Whether NCCL can be opened; `Err` says how to make it so. cudarc looks for `libnccl.so` (and `.so.1`), while
/// distributions install `libnccl.so.2` without the unversioned link unless the development package is present.
pub fn probe_nccl() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { nccl_sys::is_culib_present() } {
        return Ok(());
    }
    Err(err(
        "tensor parallelism on GPUs needs NCCL, and libnccl.so cannot be opened. If only libnccl.so.2 is installed, \
         link it: `mkdir -p ~/.cache/cleave/lib && ln -sf /usr/lib/x86_64-linux-gnu/libnccl.so.2 \
         ~/.cache/cleave/lib/libnccl.so` and add that folder to LD_LIBRARY_PATH",
    ))
}

/// A tensor-parallel backend over the GPUs `devices` (rank `r` on `devices[r]`), computing in the precision
/// `config.dtype` calls for.
pub fn tensor_parallel(devices: &[usize], config: &ModelConfig) -> Result<Tp<CudaBackend>> {
    probe_nccl()?;
    let ranks = devices
        .iter()
        .map(|&device| CudaBackend::new(device, config))
        .collect::<Result<Vec<_>>>()?;
    Tp::new(ranks)
}

impl RankBackend for CudaBackend {
    type Group = NcclGroup;

    fn group(ranks: &[Self]) -> Result<NcclGroup> {
        probe_nccl()?;
        if ranks.windows(2).any(|pair| pair[0].elem != pair[1].elem) {
            return Err(err("tensor-parallel ranks must compute in one precision"));
        }
        let ordinals: Vec<i32> = ranks.iter().map(|rank| rank.ctx.ordinal() as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); ranks.len()];
        // SAFETY: `comms` has room for one communicator per listed device.
        unsafe { nccl::comm_init_all(comms.as_mut_ptr(), ranks.len() as i32, ordinals.as_ptr()) }
            .map_err(|e| err(format!("creating NCCL communicators for GPUs {ordinals:?}: {e:?}")))?;
        Ok(NcclGroup { comms })
    }

    fn all_reduce_sum(group: &NcclGroup, ranks: &[Self], xs: &mut [CudaTensor]) {
        let mut issue = || -> std::result::Result<(), nccl::NcclError> {
            nccl::group_start()?;
            let mut issued = Ok(());
            for ((rank, x), &comm) in ranks.iter().zip(xs.iter_mut()).zip(&group.comms) {
                rank.make_current();
                rank.mark_op(|| "nccl all_reduce".into());
                let datatype = match rank.elem {
                    Elem::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
                    Elem::BF16 => nccl_sys::ncclDataType_t::ncclBfloat16,
                };
                let ptr = x.buf.ptr as *mut std::ffi::c_void;
                // SAFETY: in place over the tensor's rows × cols elements of `datatype`, on the rank's own stream;
                // every rank's tensor has the same shape (the forward pass asks each rank for the same one).
                issued = issued.and(unsafe {
                    nccl::all_reduce(
                        ptr,
                        ptr,
                        x.rows * x.cols,
                        datatype,
                        nccl_sys::ncclRedOp_t::ncclSum,
                        comm,
                        rank.stream.cu_stream() as _,
                    )
                    .map(drop)
                });
            }
            // The group is closed whatever happened inside it.
            nccl::group_end()?;
            issued
        };
        // Like a kernel launch failure: only a lost device or a broken link produces it, and the step cannot go on.
        if let Err(e) = issue() {
            panic!("NCCL all-reduce over {} GPUs failed: {e:?}", ranks.len());
        }
    }

    fn make_current(&self) {
        // Binding an existing context fails only with a lost device, which the next operation reports.
        let _ = self.ctx.bind_to_thread();
    }

    type GraphCapture = super::GraphInputs;

    fn start_graph_step(&self, step: &StepBatch) -> bool {
        CudaBackend::start_graph_step(self, step)
    }

    fn replay_graph(&self, step: &StepBatch) -> Result<CudaTensor> {
        CudaBackend::replay_graph(self, step)
    }

    fn prepare_graph_capture(&self, step: &StepBatch) -> Result<Option<(CudaBatch, super::GraphInputs)>> {
        CudaBackend::prepare_graph_capture(self, step)
    }

    fn begin_graph_capture(&self) -> Result<()> {
        CudaBackend::begin_graph_capture(self)
    }

    fn end_graph_capture(&self, capture: super::GraphInputs, logits: Result<CudaTensor>) {
        CudaBackend::end_graph_capture(self, capture, logits)
    }

    fn drop_graphs(&self) {
        // A lost device fails the synchronisation; the graphs go all the same.
        let _ = self.synchronize();
        if let Some(graphs) = &self.graphs {
            graphs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        self.retired_graphs.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
