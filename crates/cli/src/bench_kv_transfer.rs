//! `cleave bench-kv-transfer`: how fast KV blocks move from one GPU's pool to another's, next to the link's limit.
//!
//! - The link: cuMemcpyPeer of 1 GiB from the source GPU to the destination GPU, in this process.
//! - CUDA IPC, as a prefill worker moves KV: a child process (this binary, hidden `--pool-owner`) allocates a KV pool
//!   on the destination GPU and exports it; this process maps it and copies every layer of `--blocks` blocks with
//!   the backend's `copy_kv_blocks_to_peer` + `finish_peer_copies`, for block ids in order and shuffled (a
//!   fragmented pool).
//! - TCP, as the TCP transport moves KV: the device side (`export_kv_blocks`, a layer's blocks gathered on the GPU
//!   and copied to the host at once; and block by block for comparison) and loopback TCP throughput, the two stages
//!   a block goes through before it reaches the socket.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchKvTransferArgs {
    /// Model whose KV geometry (layers, KV heads, head size) the blocks have.
    #[arg(long, default_value = "llama3-8b")]
    model: String,
    /// Source and destination GPU.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    devices: Vec<usize>,
    /// Blocks per transfer (16 tokens each): 512 is an 8k-token prompt.
    #[arg(long, default_value_t = 2048)]
    blocks: usize,
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Internal: run as the child that owns the destination pool.
    #[arg(long, hide = true)]
    pool_owner: bool,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: BenchKvTransferArgs) -> Result<()> {
    anyhow::bail!("this cleave was built without the cuda feature; bench-kv-transfer measures GPUs")
}

#[cfg(feature = "cuda")]
pub fn run(args: BenchKvTransferArgs) -> Result<()> {
    match args.pool_owner {
        true => gpu::own_pool(&args),
        false => gpu::measure(&args),
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use anyhow::{Context, Result, bail};
    use cleave_engine::backend::cuda::CudaBackend;
    use cleave_engine::backend::{Backend, KvCacheExport, KvLayout, KvShareKind};
    use cleave_engine::presets::resolve_model;
    use serde_json::json;

    use super::BenchKvTransferArgs;

    const BLOCK_SIZE: usize = 16;

    fn layout(args: &BenchKvTransferArgs) -> Result<(cleave_engine::config::ModelConfig, KvLayout)> {
        let config = resolve_model(&args.model)?.config;
        let layout = KvLayout {
            n_layers: config.n_layers,
            // Room to scatter the destination blocks over twice the space.
            n_blocks: 2 * args.blocks,
            block_size: BLOCK_SIZE,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
        };
        Ok((config, layout))
    }

    fn devices(args: &BenchKvTransferArgs) -> Result<(usize, usize)> {
        match args.devices[..] {
            [src, dst] if src != dst => Ok((src, dst)),
            _ => bail!("--devices takes two different GPUs, source and destination (e.g. 0,1)"),
        }
    }

    /// The child: a pool on the destination GPU, exported on stdout as one JSON line, alive until stdin closes.
    pub fn own_pool(args: &BenchKvTransferArgs) -> Result<()> {
        let (config, layout) = layout(args)?;
        let (_, dst) = devices(args)?;
        let backend = CudaBackend::new(dst, &config)?;
        let pool = backend.kv_cache(&layout)?;
        backend.synchronize()?;
        let export = backend
            .export_kv_cache(&pool)
            .context("the KV pool cannot be exported through CUDA IPC")?;
        let line = json!({
            "handles": export.handles,
            "layer_bytes": export.layer_bytes,
            "block_bytes": export.block_bytes,
            "n_layers": export.n_layers,
        });
        println!("{line}");
        std::io::stdout().flush()?;
        std::io::stdin().read_to_end(&mut Vec::new())?;
        Ok(())
    }

    pub fn measure(args: &BenchKvTransferArgs) -> Result<()> {
        let (config, layout) = layout(args)?;
        let (src, dst) = devices(args)?;
        let backend = CudaBackend::new(src, &config)?;
        let pool = backend.kv_cache(&layout)?;
        let block_bytes = backend.kv_block_bytes(&layout);
        let bytes = args.blocks * block_bytes * layout.n_layers;
        let mut rows = Vec::new();

        let link_gbs = {
            let peer = CudaBackend::new(dst, &config)?;
            backend.measure_peer_copy_bandwidth(&peer, 1 << 30, args.repeat)?
        };
        rows.push(json!({"path": "link: cuMemcpyPeer 1 GiB", "gb_per_s": link_gbs}));

        let mut child = Command::new(std::env::current_exe()?)
            .args(["bench-kv-transfer", "--pool-owner", "--model", &args.model])
            .args([
                "--devices",
                &format!("{src},{dst}"),
                "--blocks",
                &args.blocks.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the pool-owning child")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
        let export: serde_json::Value = serde_json::from_str(&line).context("the child's pool export")?;
        let export = KvCacheExport {
            kind: KvShareKind::CudaIpc,
            handles: serde_json::from_value(export["handles"].clone())?,
            layer_bytes: export["layer_bytes"].as_u64().context("layer_bytes")?,
            block_bytes: export["block_bytes"].as_u64().context("block_bytes")?,
            n_layers: export["n_layers"].as_u64().context("n_layers")? as u32,
        };
        let opened = Instant::now();
        let peer = backend.open_peer_kv_cache(&export)?;
        let open_ms = opened.elapsed().as_secs_f64() * 1e3;

        let in_order: Vec<(u32, u32)> = (0..args.blocks as u32).map(|b| (b, b)).collect();
        // Every other destination block, in a shuffled order: no two neighbours form a run.
        let mut shuffled: Vec<(u32, u32)> = (0..args.blocks as u32).map(|b| (b, 2 * b)).collect();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let j = (state % (i as u64 + 1)) as usize;
            let dst = shuffled[j].1;
            shuffled[j].1 = shuffled[i].1;
            shuffled[i].1 = dst;
        }
        for (name, pairs) in [
            ("CUDA IPC, blocks in order", &in_order),
            ("CUDA IPC, blocks shuffled", &shuffled),
        ] {
            let mut times = Vec::new();
            for _ in 0..=args.repeat {
                let start = Instant::now();
                for layer_idx in 0..layout.n_layers {
                    backend.copy_kv_blocks_to_peer(&pool, &peer, layer_idx, pairs)?;
                }
                backend.finish_peer_copies()?;
                times.push(start.elapsed().as_secs_f64());
            }
            times.remove(0); // warm-up
            let best = times.iter().copied().fold(f64::INFINITY, f64::min);
            rows.push(json!({"path": name, "gb_per_s": bytes as f64 / best / 1e9, "seconds": best}));
        }
        backend.close_peer_kv_cache(peer);
        drop(child.stdin.take());
        child.wait()?;

        // TCP's device side: a layer's blocks gathered on the GPU and copied at once, as the transport exports them;
        // and, for comparison, one block of one layer at a time (how it did before).
        let n = args.blocks.min(4096);
        let blocks: Vec<u32> = (0..n as u32).collect();
        let mut host = vec![0u8; n * block_bytes];
        let mut best = f64::INFINITY;
        for _ in 0..args.repeat.max(1) + 1 {
            let start = Instant::now();
            backend.export_kv_blocks(&pool, 0, &blocks, &mut host)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        rows.push(json!({"path": "TCP stage 1: export_kv_blocks, a layer at once", "gb_per_s": (n * block_bytes) as f64 / best / 1e9}));
        let start = Instant::now();
        for (b, chunk) in host.chunks_exact_mut(block_bytes).enumerate() {
            backend.export_kv_block(&pool, 0, b as u32, chunk)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        rows.push(json!({"path": "TCP stage 1: export_kv_block, block by block", "gb_per_s": (n * block_bytes) as f64 / seconds / 1e9}));
        rows.push(json!({"path": "TCP stage 2: loopback socket 1 GiB", "gb_per_s": loopback_tcp_gbs(block_bytes)?}));

        eprintln!(
            "bench-kv-transfer: {} KV, GPU {src} → GPU {dst}, {} blocks × {} layers × {} KiB = {:.2} GiB per transfer; \
             IPC mapping opened in {open_ms:.1} ms",
            args.model,
            args.blocks,
            layout.n_layers,
            block_bytes / 1024,
            bytes as f64 / (1u64 << 30) as f64
        );
        for row in &rows {
            let gbs = row["gb_per_s"].as_f64().unwrap_or(0.0);
            eprintln!(
                "{:48} {gbs:8.1} GB/s  {:5.1}% of the link",
                row["path"].as_str().unwrap_or(""),
                100.0 * gbs / link_gbs
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": args.model,
                "devices": [src, dst],
                "device_name": backend.device_name(),
                "blocks": args.blocks,
                "block_bytes": block_bytes,
                "n_layers": layout.n_layers,
                "bytes_per_transfer": bytes,
                "ipc_open_ms": open_ms,
                "rows": rows,
            }))?
        );
        Ok(())
    }

    /// Loopback TCP throughput with writes of one KV block, in GB/s.
    fn loopback_tcp_gbs(chunk: usize) -> Result<f64> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let total = 1usize << 30;
        let reader = std::thread::spawn(move || -> std::io::Result<usize> {
            let (mut socket, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            loop {
                match socket.read(&mut buf)? {
                    0 => return Ok(got),
                    n => got += n,
                }
            }
        });
        let mut socket = std::net::TcpStream::connect(addr)?;
        let data = vec![7u8; chunk];
        let start = Instant::now();
        for _ in 0..total / chunk {
            socket.write_all(&data)?;
        }
        drop(socket);
        let got = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
        Ok(got as f64 / start.elapsed().as_secs_f64() / 1e9)
    }
}
