// cleave's CUDA kernels, compiled at run time by NVRTC for the device's architecture.
//
// Every kernel is a template over the activation/KV element type T (float for f32 checkpoints, __nv_bfloat16 for
// bf16 ones) and accumulates in f32. Instantiations are exported with C names `<kernel>_f32` / `<kernel>_bf16`.
// Shapes are row-major; the KV cache layout is the one KvLayout documents: per layer, block b holds K then V,
// each [block_size][n_kv_heads][head_dim].

#include <cuda_bf16.h>
#include <mma.h>

typedef unsigned int u32;
typedef unsigned long long u64;
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Eight consecutive elements of a row, as loaded: one 16-byte word of bf16, two of f32.
template <typename T> struct Pack8 {
    uint4 w[sizeof(T) / 2];
};
template <typename T> __device__ __forceinline__ Pack8<T> load8(const T* p) {
    Pack8<T> r;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); i++) r.w[i] = reinterpret_cast<const uint4*>(p)[i];
    return r;
}
template <typename T> __device__ __forceinline__ Pack8<T> zero8() {
    Pack8<T> r;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); i++) r.w[i] = make_uint4(0, 0, 0, 0);
    return r;
}
__device__ __forceinline__ void unpack8(const Pack8<__nv_bfloat16>& r, float f[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r.w[0]);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 x = __bfloat1622float2(h[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}
__device__ __forceinline__ void unpack8(const Pack8<float>& r, float f[8]) {
    const float* x = reinterpret_cast<const float*>(&r.w[0]);
#pragma unroll
    for (int i = 0; i < 8; i++) f[i] = x[i];
}
// Rounds 8 floats to T as from_f32 does (round to nearest even).
template <typename T> __device__ __forceinline__ Pack8<T> pack8(const float f[8]);
template <> __device__ __forceinline__ Pack8<__nv_bfloat16> pack8<__nv_bfloat16>(const float f[8]) {
    Pack8<__nv_bfloat16> r;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r.w[0]);
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return r;
}
template <> __device__ __forceinline__ Pack8<float> pack8<float>(const float f[8]) {
    Pack8<float> r;
    float* x = reinterpret_cast<float*>(&r.w[0]);
#pragma unroll
    for (int i = 0; i < 8; i++) x[i] = f[i];
    return r;
}
template <typename T> __device__ __forceinline__ void store8(T* p, const Pack8<T>& r) {
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); i++) reinterpret_cast<uint4*>(p)[i] = r.w[i];
}


__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float p = lane < (int)((blockDim.x + 31) >> 5) ? partial[lane] : 0.f;
        p = warp_sum(p);
        if (lane == 0) total = p;
    }
    __syncthreads();
    return total;
}

// out[t, :] = table[ids[t], :]                          grid: n_tokens, block: 256
template <typename T> __device__ void embed(T* out, const T* table, const u32* ids, u32 cols) {
    const T* row = table + (u64)ids[blockIdx.x] * cols;
    T* o = out + (u64)blockIdx.x * cols;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) o[i] = row[i];
}

// o = x * inv * w over one row: the second pass of both norms, 8 elements at a time when cols % 8 == 0.
template <typename T> __device__ void scale_row(T* o, const T* xr, const T* w, float inv, u32 cols) {
    if (cols % 8 == 0) {
        for (u32 i = 8 * threadIdx.x; i < cols; i += 8 * blockDim.x) {
            float v[8], g[8];
            unpack8(load8(xr + i), v);
            unpack8(load8(w + i), g);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = v[k] * inv * g[k];
            store8(o + i, pack8<T>(v));
        }
        return;
    }
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) o[i] = from_f32<T>(to_f32(xr[i]) * inv * to_f32(w[i]));
}

// out = x / sqrt(mean(x^2) + eps) * w, one row per block.  grid: rows, block: up to 1024 threads, each taking 8
// consecutive elements at a time (16-byte accesses) when cols % 8 == 0.
template <typename T> __device__ void rms_norm(T* out, const T* x, const T* w, float eps, u32 cols) {
    const T* xr = x + (u64)blockIdx.x * cols;
    T* o = out + (u64)blockIdx.x * cols;
    float ss = 0.f;
    if (cols % 8 == 0) {
        for (u32 i = 8 * threadIdx.x; i < cols; i += 8 * blockDim.x) {
            float v[8];
            unpack8(load8(xr + i), v);
#pragma unroll
            for (int k = 0; k < 8; k++) ss += v[k] * v[k];
        }
    } else {
        for (u32 i = threadIdx.x; i < cols; i += blockDim.x) { float v = to_f32(xr[i]); ss += v * v; }
    }
    scale_row(o, xr, w, rsqrtf(block_sum(ss) / cols + eps), cols);
}

// x += y, then out = x / sqrt(mean(x^2) + eps) * w: the residual add fused with the next norm.  grid: rows; 8
// elements at a time as in rms_norm. The residual stream keeps T's precision: the norm reads the rounded sum.
template <typename T> __device__ void add_rms_norm(T* x, const T* y, const T* w, T* out, float eps, u32 cols) {
    T* xr = x + (u64)blockIdx.x * cols;
    const T* yr = y + (u64)blockIdx.x * cols;
    T* o = out + (u64)blockIdx.x * cols;
    float ss = 0.f;
    if (cols % 8 == 0) {
        for (u32 i = 8 * threadIdx.x; i < cols; i += 8 * blockDim.x) {
            float a[8], b[8];
            unpack8(load8(xr + i), a);
            unpack8(load8(yr + i), b);
#pragma unroll
            for (int k = 0; k < 8; k++) a[k] += b[k];
            Pack8<T> sum = pack8<T>(a);
            store8(xr + i, sum);
            unpack8(sum, a);
#pragma unroll
            for (int k = 0; k < 8; k++) ss += a[k] * a[k];
        }
    } else {
        for (u32 i = threadIdx.x; i < cols; i += blockDim.x) {
            T sum = from_f32<T>(to_f32(xr[i]) + to_f32(yr[i]));
            xr[i] = sum;
            float v = to_f32(sum);
            ss += v * v;
        }
    }
    scale_row(o, xr, w, rsqrtf(block_sum(ss) / cols + eps), cols);
}

// Splits each row of qkv = [q heads | k heads | v heads]; applies the per-head q/k RMSNorm when q_norm is not null
// (Qwen3); rotates q and k (rotate-half RoPE at the token's position); writes q to q_out and k, v into the token's
// slot of one layer's cache. One warp per head, the heads spread over gridDim.y blocks (a decode step of one token
// would otherwise run every head of a layer on one SM).  grid: (n_tokens, head groups), block: 128
template <typename T>
__device__ void qkv_rope_kv(T* q_out, const T* qkv, T* layer, const u32* positions, const u32* slots,
                            const float* inv_freq, const T* q_norm, const T* k_norm, float eps, u32 n_heads,
                            u32 n_kv_heads, u32 head_dim, u32 block_size) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    u32 t = blockIdx.x, half = head_dim / 2, kv_dim = n_kv_heads * head_dim;
    const T* row = qkv + (u64)t * (n_heads + 2 * n_kv_heads) * head_dim;
    u32 slot = slots[t];
    T* k_dst = layer + (u64)(slot / block_size) * 2 * block_size * kv_dim + (u64)(slot % block_size) * kv_dim;
    T* v_dst = k_dst + (u64)block_size * kv_dim;
    float pos = (float)positions[t];
    for (u32 hi = blockIdx.y * n_warps + warp; hi < n_heads + 2 * n_kv_heads; hi += gridDim.y * n_warps) {
        const T* src = row + hi * head_dim;
        if (hi >= n_heads + n_kv_heads) {  // v: copied as is
            T* dst = v_dst + (hi - n_heads - n_kv_heads) * head_dim;
            for (u32 d = lane; d < head_dim; d += 32) dst[d] = src[d];
            continue;
        }
        bool is_q = hi < n_heads;
        T* dst = is_q ? q_out + (u64)t * n_heads * head_dim + hi * head_dim : k_dst + (hi - n_heads) * head_dim;
        const T* norm = is_q ? q_norm : k_norm;
        float inv = 1.f;
        if (norm != nullptr) {
            float ss = 0.f;
            for (u32 d = lane; d < head_dim; d += 32) { float v = to_f32(src[d]); ss += v * v; }
            inv = rsqrtf(warp_sum(ss) / head_dim + eps);
        }
        for (u32 j = lane; j < half; j += 32) {
            float a = to_f32(src[j]), b = to_f32(src[j + half]);
            if (norm != nullptr) { a = a * inv * to_f32(norm[j]); b = b * inv * to_f32(norm[j + half]); }
            float s, c;
            sincosf(pos * inv_freq[j], &s, &c);
            dst[j] = from_f32<T>(a * c - b * s);
            dst[j + half] = from_f32<T>(b * c + a * s);
        }
    }
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]. When inter % 8 == 0 each thread takes 8 consecutive
// elements (16-byte accesses; one 32-bit division per 8 elements instead of a 64-bit one per element).
template <typename T> __device__ void silu_mul(T* out, const T* gate_up, u32 inter, u64 n) {
    if (inter % 8 == 0 && n / 8 <= 0xffffffffull) {
        u32 n8 = (u32)(n / 8), inter8 = inter / 8;
        for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
            u32 r = i / inter8, c = (i - r * inter8) * 8;
            const T* gr = gate_up + (u64)r * 2 * inter + c;
            float g[8], u[8];
            unpack8(load8(gr), g);
            unpack8(load8(gr + inter), u);
#pragma unroll
            for (int k = 0; k < 8; k++) g[k] = g[k] / (1.f + __expf(-g[k])) * u[k];
            store8(out + (u64)r * inter + c, pack8<T>(g));
        }
        return;
    }
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / inter, c = i % inter;
        float g = to_f32(gate_up[r * 2 * inter + c]);
        out[i] = from_f32<T>(g / (1.f + __expf(-g)) * to_f32(gate_up[r * 2 * inter + inter + c]));
    }
}

template <typename T> __device__ void add_bias(T* x, const T* bias, u64 n, u32 cols) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % cols]));
}

template <typename T> __device__ void gather_rows(T* out, const T* x, const u32* rows, u32 cols) {
    const T* src = x + (u64)rows[blockIdx.x] * cols;
    T* dst = out + (u64)blockIdx.x * cols;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

template <typename T> __device__ void to_float(float* out, const T* x, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = to_f32(x[i]);
}

// Paged causal attention, flash-decoding style. Block (row, head, split) has ATTN_WARPS warps and covers one
// contiguous slice of the token's context: split z of gridDim.z. Each warp walks every ATTN_WARPS-th key of the slice
// with an online softmax; lanes split head_dim (element lane + 32 i). The warps merge in shared memory; with one
// split the block writes the output, otherwise it writes (max, sum, acc[head_dim]) to `partial` for attention_merge.
//   seq_of_row[t]: the token's sequence; seq_meta[s] = (q_start, q_len, context_len, block_table_offset)
#define ATTN_WARPS 8
#define HD_PER_LANE 8  // head_dim <= 256
template <typename T>
__device__ void attention(T* out, float* partial, const T* q, const T* layer, const u32* seq_of_row, const uint4* seq_meta,
                          const u32* block_tables, u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 block_size, float scale) {
    u32 row = blockIdx.x, head = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint4 meta = seq_meta[seq_of_row[row]];
    u32 pos = meta.z - meta.y + (row - meta.x);
    u32 n_ctx = pos + 1;
    u32 chunk = (n_ctx + n_splits - 1) / n_splits;
    u32 t_begin = split * chunk, t_end = min(n_ctx, t_begin + chunk);
    const u32* table = block_tables + meta.w;
    u32 kv_dim = n_kv_heads * head_dim;
    u32 kv_head = head / (n_heads / n_kv_heads);

    float qv[HD_PER_LANE], acc[HD_PER_LANE];
    const T* qh = q + (u64)row * n_heads * head_dim + head * head_dim;
#pragma unroll
    for (int i = 0; i < HD_PER_LANE; i++) {
        u32 d = lane + 32 * i;
        qv[i] = d < head_dim ? to_f32(qh[d]) * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (u32 t = t_begin + warp; t < t_end; t += ATTN_WARPS) {
        u64 base = (u64)table[t / block_size] * 2 * block_size * kv_dim;
        u32 off = t % block_size;
        const T* kt = layer + base + (u64)off * kv_dim + kv_head * head_dim;
        const T* vt = layer + base + (u64)(block_size + off) * kv_dim + kv_head * head_dim;
        float kv_k[HD_PER_LANE], kv_v[HD_PER_LANE];
#pragma unroll
        for (int i = 0; i < HD_PER_LANE; i++) {
            u32 d = lane + 32 * i;
            kv_k[i] = d < head_dim ? to_f32(kt[d]) : 0.f;
            kv_v[i] = d < head_dim ? to_f32(vt[d]) : 0.f;
        }
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < HD_PER_LANE; i++) s += qv[i] * kv_k[i];
        s = warp_sum(s);
        float m_new = fmaxf(m, s);
        float correction = __expf(m - m_new);
        float p = __expf(s - m_new);
        l = l * correction + p;
#pragma unroll
        for (int i = 0; i < HD_PER_LANE; i++) acc[i] = acc[i] * correction + p * kv_v[i];
        m = m_new;
    }
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][32 * HD_PER_LANE];
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < HD_PER_LANE; i++) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float m_all = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; w++) m_all = fmaxf(m_all, s_m[w]);
    float l_all = 0.f, o[HD_PER_LANE];
#pragma unroll
    for (int i = 0; i < HD_PER_LANE; i++) o[i] = 0.f;
    for (int w = 0; w < ATTN_WARPS; w++) {
        float f = s_m[w] == NEG_INF ? 0.f : __expf(s_m[w] - m_all);
        l_all += s_l[w] * f;
#pragma unroll
        for (int i = 0; i < HD_PER_LANE; i++) o[i] += s_acc[w][lane + 32 * i] * f;
    }
    if (n_splits == 1) {
        T* oh = out + (u64)row * n_heads * head_dim + head * head_dim;
#pragma unroll
        for (int i = 0; i < HD_PER_LANE; i++) {
            u32 d = lane + 32 * i;
            if (d < head_dim) oh[d] = from_f32<T>(o[i] / l_all);
        }
    } else {
        float* pp = partial + (((u64)row * n_heads + head) * n_splits + split) * (head_dim + 2);
        if (lane == 0) { pp[0] = m_all; pp[1] = l_all; }
#pragma unroll
        for (int i = 0; i < HD_PER_LANE; i++) {
            u32 d = lane + 32 * i;
            if (d < head_dim) pp[2 + d] = o[i];
        }
    }
}

// The same attention for grouped-query models, one block per (token, kv head, split): the GROUP query heads that
// share a kv head are computed together, so each K and V row is read once for all of them (GROUP times fewer bytes
// than `attention`). A half-warp takes one key: each of its lanes holds 8 consecutive elements of the K and V rows
// (one 16-byte load each; a 128-wide bf16 row is one 256-byte read by 16 lanes). Each iteration a half-warp loads
// the rows of GqaKeys<GROUP> keys before computing with any of them and updates its online softmax once for all of
// them: a block keeps 16 * GqaKeys keys in flight, where a warp per key (the previous layout) left HBM idle between
// dependent loads (batch 64: 55% of HBM bandwidth end to end, against 71%). Scores are summed over 16 lanes (4
// shuffles each). The two half-warps of a warp keep separate (max, sum, acc) and merge at the end.
// head_dim % 8 == 0 and <= 128. Writes the output, or partials in `attention`'s layout.
template <int GROUP> struct GqaKeys {
    static constexpr int value = GROUP <= 4 ? 4 : 2;  // registers: GROUP * 8 query + GROUP * 8 accumulator floats
};
template <typename T, int GROUP>
__device__ void attention_gqa(T* out, float* partial, const T* q, const T* layer, const u32* seq_of_row,
                                 const uint4* seq_meta, const u32* block_tables, u32 n_heads, u32 n_kv_heads,
                                 u32 head_dim, u32 block_size, float scale) {
    constexpr int U = GqaKeys<GROUP>::value;
    u32 row = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, half = lane >> 4;
    uint4 meta = seq_meta[seq_of_row[row]];
    u32 pos = meta.z - meta.y + (row - meta.x);
    u32 n_ctx = pos + 1;
    u32 chunk = (n_ctx + n_splits - 1) / n_splits;
    u32 t_begin = split * chunk, t_end = min(n_ctx, t_begin + chunk);
    const u32* table = block_tables + meta.w;
    u32 kv_dim = n_kv_heads * head_dim;
    const u32 d0 = 8 * (lane & 15);
    const bool active = d0 < head_dim;

    float qv[GROUP][8], acc[GROUP][8], m[GROUP], l[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        const T* qh = q + (u64)row * n_heads * head_dim + (kv_head * GROUP + g) * head_dim;
        unpack8(active ? load8(qh + d0) : zero8<T>(), qv[g]);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            qv[g][i] *= scale;
            acc[g][i] = 0.f;
        }
        m[g] = NEG_INF;
        l[g] = 0.f;
    }
    // Warp w's keys in an iteration: t0 .. t0 + 2U, key 2u + half for this half-warp.
    for (u32 t0 = t_begin + warp * 2 * U; t0 < t_end; t0 += 2 * U * ATTN_WARPS) {
        Pack8<T> kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            u32 t = t0 + 2 * u + half;
            if (t < t_end && active) {
                const T* k_row = layer + (u64)table[t / block_size] * 2 * block_size * kv_dim +
                                 (u64)(t % block_size) * kv_dim + kv_head * head_dim + d0;
                kr[u] = load8(k_row);
                vr[u] = load8(k_row + (u64)block_size * kv_dim);
            } else {
                kr[u] = vr[u] = zero8<T>();
            }
        }
        float s[GROUP][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float k[8];
            unpack8(kr[u], k);
#pragma unroll
            for (int g = 0; g < GROUP; g++) {
                s[g][u] = 0.f;
#pragma unroll
                for (int i = 0; i < 8; i++) s[g][u] += qv[g][i] * k[i];
            }
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) {
#pragma unroll
            for (int g = 0; g < GROUP; g++) {
#pragma unroll
                for (int u = 0; u < U; u++) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], o);
            }
        }
        float p[GROUP][U];
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            float m_new = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (t0 + 2 * u + half >= t_end) s[g][u] = NEG_INF;
                m_new = fmaxf(m_new, s[g][u]);
            }
            // No key of this half-warp yet (m_new = -inf): nothing to add, and exp(-inf - -inf) would be NaN.
            bool none = m_new == NEG_INF;
            float correction = none ? 1.f : __expf(m[g] - m_new);
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < U; u++) {
                p[g][u] = none ? 0.f : __expf(s[g][u] - m_new);
                sum += p[g][u];
            }
            l[g] = l[g] * correction + sum;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[g][i] *= correction;
            m[g] = m_new;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float v[8];
            unpack8(vr[u], v);
#pragma unroll
            for (int g = 0; g < GROUP; g++) {
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] += p[g][u] * v[i];
            }
        }
    }
    // Merge the two half-warps (lanes l and l ^ 16 hold the same elements).
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        float m_o = __shfl_xor_sync(0xffffffffu, m[g], 16), l_o = __shfl_xor_sync(0xffffffffu, l[g], 16);
        float m_all = fmaxf(m[g], m_o);
        float f = m[g] == NEG_INF ? 0.f : __expf(m[g] - m_all);
        float f_o = m_o == NEG_INF ? 0.f : __expf(m_o - m_all);
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * f + __shfl_xor_sync(0xffffffffu, acc[g][i], 16) * f_o;
        l[g] = l[g] * f + l_o * f_o;
        m[g] = m_all;
    }
    __shared__ float s_m[ATTN_WARPS][GROUP], s_l[ATTN_WARPS][GROUP];
    __shared__ float s_acc[ATTN_WARPS][GROUP][128];
    if (half == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            if (lane == 0) { s_m[warp][g] = m[g]; s_l[warp][g] = l[g]; }
            if (active) {
#pragma unroll
                for (int i = 0; i < 8; i++) s_acc[warp][g][d0 + i] = acc[g][i];
            }
        }
    }
    __syncthreads();
    // Every thread merges some (head, element) pairs across the warps.
    for (u32 idx = threadIdx.x; idx < GROUP * head_dim; idx += blockDim.x) {
        u32 g = idx / head_dim, d = idx % head_dim;
        float m_all = NEG_INF;
        for (int w = 0; w < ATTN_WARPS; w++) m_all = fmaxf(m_all, s_m[w][g]);
        float l_all = 0.f, o = 0.f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            float f = s_m[w][g] == NEG_INF ? 0.f : __expf(s_m[w][g] - m_all);
            l_all += s_l[w][g] * f;
            o += s_acc[w][g][d] * f;
        }
        u32 head = kv_head * GROUP + g;
        if (n_splits == 1) {
            out[(u64)row * n_heads * head_dim + head * head_dim + d] = from_f32<T>(o / l_all);
        } else {
            float* pp = partial + (((u64)row * n_heads + head) * n_splits + split) * (head_dim + 2);
            if (d == 0) { pp[0] = m_all; pp[1] = l_all; }
            pp[2 + d] = o;
        }
    }
}

// Combines the splits of `attention`.  grid: (n_tokens, n_heads), block: head_dim threads (<= 256)
template <typename T>
__device__ void attention_merge(T* out, const float* partial, u32 n_heads, u32 head_dim, u32 n_splits) {
    u32 row = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
    const float* pp = partial + ((u64)row * n_heads + head) * n_splits * (head_dim + 2);
    float m_all = NEG_INF;
    for (u32 z = 0; z < n_splits; z++) m_all = fmaxf(m_all, pp[z * (head_dim + 2)]);
    float l_all = 0.f, o = 0.f;
    for (u32 z = 0; z < n_splits; z++) {
        const float* p = pp + z * (head_dim + 2);
        float f = p[0] == NEG_INF ? 0.f : __expf(p[0] - m_all);
        l_all += p[1] * f;
        if (d < head_dim) o += p[2 + d] * f;
    }
    if (d < head_dim) out[(u64)row * n_heads * head_dim + head * head_dim + d] = from_f32<T>(o / l_all);
}

// Prefill attention on tensor cores (bf16, WMMA 16x16x16, f32 accumulation), flash-attention style: one block of
// FA_WARPS warps per (query tile of up to 64 rows of one sequence, head); each warp owns 16 query rows and walks the
// causal key range 32 keys (two 16-token groups of the paged cache) at a time with an online softmax. K and V
// fragments load straight from the paged cache (a 16-key group lies inside one KV block when block_size % 16 == 0).
// The output accumulator lives in shared memory so it can be rescaled row by row.
//   tiles[i] = (seq index, first row, rows); head_dim % 16 == 0 and <= 128.
#define FA_WARPS 4
#define FA_KEYS 32
#define FA_HD_MAX 128
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32)
flash_prefill_bf16(__nv_bfloat16* out, const __nv_bfloat16* q, const __nv_bfloat16* layer, const uint4* tiles,
                   const uint4* seq_meta, const u32* block_tables, u32 n_heads, u32 n_kv_heads, u32 head_dim,
                   u32 block_size, float scale) {
    using namespace nvcuda;
    __shared__ __align__(32) float s_o[FA_WARPS][16 * FA_HD_MAX];
    __shared__ __align__(32) float s_s[FA_WARPS][16 * FA_KEYS];
    __shared__ __align__(32) __nv_bfloat16 s_p[FA_WARPS][16 * FA_KEYS];

    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint4 tile = tiles[blockIdx.x];
    u32 head = blockIdx.y;
    uint4 meta = seq_meta[tile.x];
    u32 q_row0 = tile.y + 16 * warp;                      // first global row of this warp
    if (16 * warp >= tile.z) return;                      // no rows for this warp (short tile)
    u32 n_rows = min(16u, tile.z - 16 * warp);
    u32 ctx_start = meta.z - meta.y;                      // position of the sequence's first new token
    u32 pos0 = ctx_start + (q_row0 - meta.x);             // position of the warp's first row
    u32 pos_last = pos0 + n_rows - 1;
    const u32* table = block_tables + meta.w;
    u32 kv_dim = n_kv_heads * head_dim;
    u32 kv_head = head / (n_heads / n_kv_heads);
    u32 n_chunks = head_dim / 16;
    u32 q_stride = n_heads * head_dim;
    float* o = s_o[warp];

    // Stage Q (rows past the tile zeroed) through the output buffer, into fragments kept for the whole loop.
    __nv_bfloat16* q_stage = reinterpret_cast<__nv_bfloat16*>(o);
    for (u32 i = lane; i < 16 * head_dim; i += 32) {
        u32 r = i / head_dim, d = i % head_dim;
        q_stage[i] = r < n_rows ? q[(u64)(q_row0 + r) * q_stride + head * head_dim + d] : __float2bfloat16(0.f);
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> qf[FA_HD_MAX / 16];
#pragma unroll
    for (int c = 0; c < FA_HD_MAX / 16; c++)
        if (c < n_chunks) wmma::load_matrix_sync(qf[c], q_stage + c * 16, head_dim);
    __syncwarp();
    for (u32 i = lane; i < 16 * head_dim; i += 32) o[i] = 0.f;

    // Lanes 2r and 2r+1 keep row r's running max and sum.
    u32 my_row = lane >> 1, half = lane & 1;
    float m = NEG_INF, l = 0.f;
    u32 my_pos = pos0 + my_row;

    for (u32 key0 = 0; key0 <= pos_last; key0 += FA_KEYS) {
        // S = Q K^T for 32 keys: two 16-key groups.
#pragma unroll
        for (int g = 0; g < FA_KEYS / 16; g++) {
            u32 t0 = key0 + 16 * g;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
            wmma::fill_fragment(sf, 0.f);
            if (t0 <= pos_last) {
                const __nv_bfloat16* kb = layer + (u64)table[t0 / block_size] * 2 * block_size * kv_dim
                                          + (u64)(t0 % block_size) * kv_dim + kv_head * head_dim;
                // Unrolled with a constant bound: a run-time index would move qf to local memory.
#pragma unroll
                for (int c = 0; c < FA_HD_MAX / 16; c++) {
                    if (c < (int)n_chunks) {
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> kf;
                        wmma::load_matrix_sync(kf, kb + c * 16, kv_dim);
                        wmma::mma_sync(sf, qf[c], kf, sf);
                    }
                }
            }
            wmma::store_matrix_sync(s_s[warp] + 16 * g, sf, FA_KEYS, wmma::mem_row_major);
        }
        __syncwarp();
        // Online softmax of row my_row over this step's keys; each lane of the pair takes 16 columns.
        float s_local[16];
        float mx = NEG_INF;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            u32 col = half * 16 + j, t = key0 + col;
            float v = (my_row < n_rows && t <= my_pos) ? s_s[warp][my_row * FA_KEYS + col] * scale : NEG_INF;
            s_local[j] = v;
            mx = fmaxf(mx, v);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float m_new = fmaxf(m, mx);
        float correction = m_new == NEG_INF ? 1.f : __expf(m - m_new);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            float p = s_local[j] == NEG_INF ? 0.f : __expf(s_local[j] - m_new);
            sum += p;
            s_p[warp][my_row * FA_KEYS + half * 16 + j] = __float2bfloat16(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * correction + sum;
        m = m_new;
        // Rescale this row's output accumulator.
        for (u32 d = half; d < head_dim; d += 2) o[my_row * head_dim + d] *= correction;
        __syncwarp();
        // O += P V over the two 16-key groups, chunk by chunk of head_dim.
        for (u32 c = 0; c < n_chunks; c++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
            wmma::load_matrix_sync(of, o + c * 16, head_dim, wmma::mem_row_major);
#pragma unroll
            for (int g = 0; g < FA_KEYS / 16; g++) {
                u32 t0 = key0 + 16 * g;
                if (t0 > pos_last) continue;
                const __nv_bfloat16* vb = layer + (u64)table[t0 / block_size] * 2 * block_size * kv_dim
                                          + (u64)(block_size + t0 % block_size) * kv_dim + kv_head * head_dim;
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, s_p[warp] + 16 * g, FA_KEYS);
                wmma::load_matrix_sync(vf, vb + c * 16, kv_dim);
                wmma::mma_sync(of, pf, vf, of);
            }
            wmma::store_matrix_sync(o + c * 16, of, head_dim, wmma::mem_row_major);
        }
        __syncwarp();
    }
    if (my_row < n_rows) {
        float inv = 1.f / l;
        __nv_bfloat16* orow = out + (u64)(q_row0 + my_row) * q_stride + head * head_dim;
        for (u32 d = half; d < head_dim; d += 2) orow[d] = __float2bfloat16(o[my_row * head_dim + d] * inv);
    }
}

// FlashAttention-2-style prefill for bf16 and head_dim 128 on mma.sync tensor cores (m16n8k16, f32 accumulation).
// A block of FA2_WARPS warps covers one query tile of one sequence for HG query heads of one kv group (GQA): warp w
// takes 16 rows of head w / (FA2_WARPS / HG), so a tile has 16 × FA2_WARPS / HG rows and each K/V tile loaded into
// shared memory serves all HG heads. The block walks the causal key range FA2_KEYS keys at a time: the whole block
// stages K and V (paged: each key row is addressed through the block table, so any block_size works) into shared
// memory with cp.async, two stages deep. Each warp keeps its Q fragments, S = Q Kᵀ and the output O in registers,
// runs the online softmax there (a row's max and sum reduced across the 4 lanes that hold it), and re-packs P into
// bf16 A fragments for O += P V (V read with ldmatrix.trans). Only tiles that cross a warp's diagonal are masked;
// tiles wholly past a warp's last row are skipped. With QS, Q lives in shared memory instead and each tile re-reads
// its fragments with ldmatrix: 128 registers per thread (220 without), so two blocks share an SM.
//   tiles[i] = (seq index, first row, rows, 0), tiles of 16 × FA2_WARPS / HG rows; grid: (n_heads / HG, n_tiles)
//   shared memory: 2 stages × (K, V) × FA2_KEYS × 256 bytes = 64 KiB (dynamic), + 32 KiB of Q with QS
// Shared-memory rows are 256 bytes (16 chunks of 16 bytes); chunk c of row r lives at chunk c ^ (r & 7), so the 8
// rows that one ldmatrix phase reads fall in 8 different bank groups.
#define FA2_HD 128
#define FA2_KEYS 64
#define FA2_WARPS 8
#define FA2_ROW_BYTES (FA2_HD * 2)
#define FA2_TILE_BYTES (FA2_KEYS * FA2_ROW_BYTES)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Copies 16 bytes global -> shared; with src_bytes == 0 it writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a · b for one 16×8×16 step: a is a 16×16 row-major bf16 fragment, b a 16×8 column-major one.
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Two floats as one register of two bf16, the first in the low half (the lower column of a fragment).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

template <int HG, bool QS>
__device__ __forceinline__ void flash2_prefill(__nv_bfloat16* out, const __nv_bfloat16* q, const __nv_bfloat16* layer,
                                               const uint4* tiles, const uint4* seq_meta, const u32* block_tables,
                                               u32 n_tiles, u32 n_heads, u32 n_kv_heads, u32 block_size,
                                               float scale_log2) {
    constexpr int RB = FA2_WARPS / HG;  // 16-row blocks per head
    extern __shared__ __align__(128) unsigned char fa2_smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;  // fragment row group and column pair
    // The longest tiles (last rows of a sequence) first, so that the short ones fill the tail of the grid.
    const uint4 tile = tiles[n_tiles - 1 - blockIdx.y];
    const uint4 meta = seq_meta[tile.x];
    const u32 head = blockIdx.x * HG + warp / RB;
    const u32 kv_head = blockIdx.x * HG / (n_heads / n_kv_heads);
    const u32 kv_dim = n_kv_heads * FA2_HD, q_stride = n_heads * FA2_HD;
    const u32* table = block_tables + meta.w;
    const u32 tile_pos0 = meta.z - meta.y + (tile.y - meta.x);  // position of the tile's first row
    const u32 kv_len = tile_pos0 + tile.z;                      // keys the tile's last row sees
    const u32 n_kv_tiles = (kv_len + FA2_KEYS - 1) / FA2_KEYS;
    const u32 w_row0 = 16 * (warp % RB);
    const u32 w_rows = tile.z > w_row0 ? min(16u, tile.z - w_row0) : 0u;
    const u32 w_pos0 = tile_pos0 + w_row0;
    const u32 w_pos_end = w_pos0 + w_rows;  // keys at or past this are masked for all of the warp's rows

    // Q as A fragments for the 8 16-wide slices of head_dim, in registers (QS false) or re-read from shared memory
    // each tile (QS true: fewer registers, two blocks per SM); rows past the tile are zeros.
    u32 qa[QS ? 1 : FA2_HD / 16][4];
    const u32 smem0 = smem_addr(fa2_smem);
    const u32 q_smem = smem0 + 2 * 2 * FA2_TILE_BYTES + warp * 16 * FA2_ROW_BYTES;
    if constexpr (QS) {
        // 16 rows × 16 chunks per warp; lane copies chunk lane % 16 of rows lane / 16 + 2 i (swizzled like K).
        const u32 c = lane & 15;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const u32 r = (lane >> 4) + 2 * i;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < w_rows)
                v = *reinterpret_cast<const uint4*>(q + (u64)(tile.y + w_row0 + r) * q_stride + head * FA2_HD + c * 8);
            const u32 dst = q_smem + r * FA2_ROW_BYTES + ((c ^ (r & 7)) << 4);
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                         : "memory");
        }
    } else {
        const __nv_bfloat16* q0 = q + (u64)(tile.y + w_row0 + g) * q_stride + head * FA2_HD + 2 * t4;
        const __nv_bfloat16* q1 = q0 + 8 * (u64)q_stride;
        const bool ok0 = (u32)g < w_rows, ok1 = (u32)g + 8 < w_rows;
#pragma unroll
        for (int kc = 0; kc < FA2_HD / 16; kc++) {
            qa[kc][0] = ok0 ? *reinterpret_cast<const u32*>(q0 + 16 * kc) : 0u;
            qa[kc][1] = ok1 ? *reinterpret_cast<const u32*>(q1 + 16 * kc) : 0u;
            qa[kc][2] = ok0 ? *reinterpret_cast<const u32*>(q0 + 16 * kc + 8) : 0u;
            qa[kc][3] = ok1 ? *reinterpret_cast<const u32*>(q1 + 16 * kc + 8) : 0u;
        }
    }

    // Stage `stage` <- keys key0 .. key0 + FA2_KEYS of K and V; keys past kv_len are zero-filled (never read from
    // the table, which may end there). Thread tid copies chunk tid % 16 of rows tid / 16 + 16 i.
    auto load_tile = [&](u32 key0, u32 stage) {
        const u32 k_base = smem0 + stage * 2 * FA2_TILE_BYTES, v_base = k_base + FA2_TILE_BYTES;
        const u32 c = tid & 15;
#pragma unroll
        for (int i = 0; i < FA2_KEYS * 16 / (FA2_WARPS * 32); i++) {
            const u32 r = (tid >> 4) + 16 * i, t = key0 + r;
            const u32 dst = r * FA2_ROW_BYTES + ((c ^ (r & 7)) << 4);
            const __nv_bfloat16* k_src = layer;
            const __nv_bfloat16* v_src = layer;
            u32 bytes = 0;
            if (t < kv_len) {
                k_src = layer + (u64)table[t / block_size] * 2 * block_size * kv_dim + (u64)(t % block_size) * kv_dim
                        + kv_head * FA2_HD + c * 8;
                v_src = k_src + (u64)block_size * kv_dim;
                bytes = 16;
            }
            cp_async16(k_base + dst, k_src, bytes);
            cp_async16(v_base + dst, v_src, bytes);
        }
    };

    float o[FA2_HD / 8][4];
#pragma unroll
    for (int n = 0; n < FA2_HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // Rows g and g + 8 of the warp's 16: running max (of raw scores) and this lane's share of the running sum.
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    // ldmatrix row addresses: lane supplies row (lane & 7) of matrix lane >> 3; the swizzle term is lane & 7.
    const u32 lrow = lane & 7, lmat = lane >> 3;

    load_tile(0, 0);
    cp_async_commit();
    for (u32 it = 0; it < n_kv_tiles; it++) {
        if (it + 1 < n_kv_tiles) load_tile((it + 1) * FA2_KEYS, (it + 1) & 1);
        cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning "tile it"
        cp_async_wait_1();
        __syncthreads();
        const u32 key0 = it * FA2_KEYS;
        if (w_rows > 0 && key0 < w_pos_end) {
            const u32 k_base = smem0 + (it & 1) * 2 * FA2_TILE_BYTES, v_base = k_base + FA2_TILE_BYTES;
            // S = Q Kᵀ: 8 blocks of 8 keys.
            float s[FA2_KEYS / 8][4];
#pragma unroll
            for (int j = 0; j < FA2_KEYS / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            if constexpr (QS) {
                // Per 16-dim slice kc: Q's A fragment by ldmatrix (matrices rows +0/+8 × dims +0/+8), then K's B
                // fragments for two 8-key blocks per ldmatrix.x4 (keys +0/+8 × dims +0/+8).
                const u32 qr = lrow + 8 * (lmat & 1);
#pragma unroll
                for (int kc = 0; kc < FA2_HD / 16; kc++) {
                    u32 qf[4];
                    ldmatrix_x4(qf, q_smem + qr * FA2_ROW_BYTES + (((2 * kc + (lmat >> 1)) ^ lrow) << 4));
#pragma unroll
                    for (int jj = 0; jj < FA2_KEYS / 16; jj++) {
                        const u32 r = 16 * jj + lrow + 8 * (lmat >> 1), c = 2 * kc + (lmat & 1);
                        u32 b[4];
                        ldmatrix_x4(b, k_base + r * FA2_ROW_BYTES + ((c ^ lrow) << 4));
                        mma_bf16_16816(s[2 * jj], qf, b[0], b[1]);
                        mma_bf16_16816(s[2 * jj + 1], qf, b[2], b[3]);
                    }
                }
            } else {
                // Per 8-key block j, one ldmatrix.x4 gives its B fragments for two 16-dim slices.
#pragma unroll
                for (int kc2 = 0; kc2 < FA2_HD / 32; kc2++) {
#pragma unroll
                    for (int j = 0; j < FA2_KEYS / 8; j++) {
                        const u32 r = 8 * j + lrow, c = 4 * kc2 + lmat;
                        u32 b[4];
                        ldmatrix_x4(b, k_base + r * FA2_ROW_BYTES + ((c ^ lrow) << 4));
                        mma_bf16_16816(s[j], qa[2 * kc2], b[0], b[1]);
                        mma_bf16_16816(s[j], qa[2 * kc2 + 1], b[2], b[3]);
                    }
                }
            }
            // Causal mask, only where the tile crosses the warp's diagonal. Lane holds keys key0 + 8 j + 2 t4 + e.
            if (key0 + FA2_KEYS - 1 > w_pos0) {
                const u32 p0 = w_pos0 + g, p1 = p0 + 8;
#pragma unroll
                for (int j = 0; j < FA2_KEYS / 8; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const u32 key = key0 + 8 * j + 2 * t4 + e;
                        if (key > p0) s[j][e] = NEG_INF;
                        if (key > p1) s[j][2 + e] = NEG_INF;
                    }
                }
            }
            // Online softmax. Key 0 is visible to every row and is in the first tile, so the running max is finite
            // from the first tile on; the guard only keeps a fully masked row free of inf - inf.
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int j = 0; j < FA2_KEYS / 8; j++) {
                mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            const float mb0 = mn0 == NEG_INF ? 0.f : mn0 * scale_log2;
            const float mb1 = mn1 == NEG_INF ? 0.f : mn1 * scale_log2;
            const float corr0 = fast_exp2(m0 * scale_log2 - mb0), corr1 = fast_exp2(m1 * scale_log2 - mb1);
            m0 = mn0;
            m1 = mn1;
            l0 *= corr0;
            l1 *= corr1;
#pragma unroll
            for (int n = 0; n < FA2_HD / 8; n++) {
                o[n][0] *= corr0;
                o[n][1] *= corr0;
                o[n][2] *= corr1;
                o[n][3] *= corr1;
            }
            // P = exp2(S · scale · log2 e − max), packed straight from the S accumulators into A fragments: keys
            // 16 kk .. 16 kk + 15 are S blocks 2 kk and 2 kk + 1.
            u32 pa[FA2_KEYS / 16][4];
#pragma unroll
            for (int kk = 0; kk < FA2_KEYS / 16; kk++) {
                const float p00 = fast_exp2(fmaf(s[2 * kk][0], scale_log2, -mb0));
                const float p01 = fast_exp2(fmaf(s[2 * kk][1], scale_log2, -mb0));
                const float p02 = fast_exp2(fmaf(s[2 * kk][2], scale_log2, -mb1));
                const float p03 = fast_exp2(fmaf(s[2 * kk][3], scale_log2, -mb1));
                const float p10 = fast_exp2(fmaf(s[2 * kk + 1][0], scale_log2, -mb0));
                const float p11 = fast_exp2(fmaf(s[2 * kk + 1][1], scale_log2, -mb0));
                const float p12 = fast_exp2(fmaf(s[2 * kk + 1][2], scale_log2, -mb1));
                const float p13 = fast_exp2(fmaf(s[2 * kk + 1][3], scale_log2, -mb1));
                l0 += p00 + p01 + p10 + p11;
                l1 += p02 + p03 + p12 + p13;
                pa[kk][0] = pack_bf16x2(p00, p01);
                pa[kk][1] = pack_bf16x2(p02, p03);
                pa[kk][2] = pack_bf16x2(p10, p11);
                pa[kk][3] = pack_bf16x2(p12, p13);
            }
            // O += P V: for 16 keys and 16 dims, one ldmatrix.x4.trans gives the B fragments of two 8-dim blocks
            // (matrices: keys +0/+8 × dims +0/+8).
#pragma unroll
            for (int kk = 0; kk < FA2_KEYS / 16; kk++) {
#pragma unroll
                for (int d2 = 0; d2 < FA2_HD / 16; d2++) {
                    const u32 r = 16 * kk + lrow + 8 * (lmat & 1), c = 2 * d2 + (lmat >> 1);
                    u32 b[4];
                    ldmatrix_x4_trans(b, v_base + r * FA2_ROW_BYTES + ((c ^ lrow) << 4));
                    mma_bf16_16816(o[2 * d2], pa[kk], b[0], b[1]);
                    mma_bf16_16816(o[2 * d2 + 1], pa[kk], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the next iteration's copy overwrites this stage
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    __nv_bfloat16* o0 = out + (u64)(tile.y + w_row0 + g) * q_stride + head * FA2_HD + 2 * t4;
    __nv_bfloat16* o1 = o0 + 8 * (u64)q_stride;
    if ((u32)g < w_rows) {
#pragma unroll
        for (int n = 0; n < FA2_HD / 8; n++) *reinterpret_cast<u32*>(o0 + 8 * n) = pack_bf16x2(o[n][0] * inv0, o[n][1] * inv0);
    }
    if ((u32)g + 8 < w_rows) {
#pragma unroll
        for (int n = 0; n < FA2_HD / 8; n++) *reinterpret_cast<u32*>(o1 + 8 * n) = pack_bf16x2(o[n][2] * inv1, o[n][3] * inv1);
    }
}

#define INSTANTIATE_FA2(NAME, HG, QS)                                                                                 \
    extern "C" __global__ void __launch_bounds__(FA2_WARPS * 32, QS ? 2 : 1) NAME##_hd128_g##HG##_bf16(            \
        __nv_bfloat16* out, const __nv_bfloat16* q, const __nv_bfloat16* layer, const uint4* tiles,                   \
        const uint4* seq_meta, const u32* block_tables, u32 n_tiles, u32 n_heads, u32 n_kv_heads, u32 block_size,     \
        float scale_log2) {                                                                                           \
        flash2_prefill<HG, QS>(out, q, layer, tiles, seq_meta, block_tables, n_tiles, n_heads, n_kv_heads, block_size,    \
                           scale_log2);                                                                               \
    }
INSTANTIATE_FA2(flash2_prefill, 1, false)
INSTANTIATE_FA2(flash2_prefill, 2, false)
INSTANTIATE_FA2(flash2_prefill, 4, false)
INSTANTIATE_FA2(flash2_prefill, 8, false)
INSTANTIATE_FA2(flash2q_prefill, 1, true)
INSTANTIATE_FA2(flash2q_prefill, 2, true)
INSTANTIATE_FA2(flash2q_prefill, 4, true)
INSTANTIATE_FA2(flash2q_prefill, 8, true)

// ---- Sampling on the device ----
// The algorithm of crates/engine/src/sampler.rs (read its module docs first), step for step and with the same
// rounding: every float operation is an explicit round-to-nearest intrinsic, so nothing is contracted into an FMA and
// the host's and the device's weights are equal bit for bit; sums of weights are integers, so no order matters.
// One block per row (256, 512 or 1024 threads), dynamic shared memory: SAMPLE_SMEM_PER_THREAD bytes per thread.

struct SampleParams {
    u64 word;  // draw_word(seed, draw)
    float temperature;
    float top_p;
    u32 top_k;
    u32 banned_start;  // the row's banned ids: banned[banned_start .. banned_start + banned_len]
    u32 banned_len;
    u32 pad;
};

#define SAMPLE_BINS 16
#define SAMPLE_BINS_LOG2 4
#define SAMPLE_SMEM_PER_THREAD (SAMPLE_BINS * 12)
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ u32 float_key(float x) {
    u32 b = __float_as_uint(x);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

// e^a for -80 <= a <= 0: sampler.rs's exp_neg, operation for operation.
__device__ __forceinline__ float exp_neg(float a) {
    const float k = rintf(__fmul_rn(a, __uint_as_float(0x3fb8aa3bu)));
    const float r = __fsub_rn(__fsub_rn(a, __fmul_rn(k, __uint_as_float(0x3f318000u))),
                              __fmul_rn(k, __uint_as_float(0xb95e8083u)));
    const u32 c[8] = {0x39500d01u, 0x3ab60b61u, 0x3c088889u, 0x3d2aaaabu,
                      0x3e2aaaabu, 0x3f000000u, 0x3f800000u, 0x3f800000u};
    float p = __uint_as_float(c[0]);
#pragma unroll
    for (int i = 1; i < 8; i++) p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(c[i]));
    return __fmul_rn(p, __uint_as_float((u32)(127 + (int)k) << 23));
}

// trunc(e^((x - m) / T) * 2^s): sampler.rs's token_weight.
__device__ __forceinline__ u64 token_weight(float x, float m, float inv_t, float scale) {
    const float a = __fmul_rn(__fsub_rn(x, m), inv_t);
    if (!(a >= -80.f)) return 0;
    return __float2ull_rz(__fmul_rn(exp_neg(a), scale));
}

template <typename T> __device__ __forceinline__ T nan_value();
template <> __device__ __forceinline__ float nan_value<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ __nv_bfloat16 nan_value<__nv_bfloat16>() { return __ushort_as_bfloat16(0x7fc0); }

struct SampleShared {
    u64 bin_sum[SAMPLE_BINS];
    u32 bin_cnt[SAMPLE_BINS];
    u64 part[32];
    u32 part_cnt[32];
    float best_v[32];
    u32 best_i[32];
    double target;
    u64 above;
    u64 r;
    u32 prefix, bits, state, result, n_gathered, begin, end, token;
};

__device__ __forceinline__ bool argmax_better(float v, u32 i, float best, u32 best_i) {
    return v > best || (v == best && i < best_i);
}

// The largest key v >= lo such that the allowed tokens with key >= v weigh (WEIGHTED) or number (else) at least the
// target: `target_or_p` itself, or (WEIGHTED) top_p times the weight of all allowed tokens with key >= lo. A radix
// descent over the key, SAMPLE_BINS bins per pass (each thread counts into its own column of bins: no atomics), until
// the bin that holds the answer has at most one token per thread; those are gathered, sorted and scanned. Counting
// mode keeps only the u32 counts (half the shared-memory traffic).
template <typename T, bool WEIGHTED>
__device__ u32 sample_select(const T* row, u32 vocab, u32 lo, float m, float inv_t, float scale, double target_or_p,
                             SampleShared& sh, u64* bins, u32* cnts) {
    const u32 tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    if (tid == 0) {
        sh.prefix = 0;
        sh.bits = 0;
        sh.above = 0;
        sh.target = WEIGHTED ? -1.0 : target_or_p;
        sh.state = 0;
    }
    __syncthreads();
    while (true) {
        const u32 bits = sh.bits, prefix = sh.prefix, state = sh.state;
        if (state == 2) break;
        if (state == 0) {
            const u32 digit_shift = 32 - SAMPLE_BINS_LOG2 - bits;
#pragma unroll
            for (int b = 0; b < SAMPLE_BINS; b++) {
                if (WEIGHTED) bins[b * nt + tid] = 0;
                cnts[b * nt + tid] = 0;
            }
            for (u32 i = tid; i < vocab; i += nt) {
                const float x = to_f32(row[i]);
                if (x != x) continue;
                const u32 key = float_key(x);
                if (key < lo || (bits > 0 && (key >> (32 - bits)) != prefix)) continue;
                const u32 b = (key >> digit_shift) & (SAMPLE_BINS - 1);
                if (WEIGHTED) {
                    // Tokens of weight 0 change no sum and cannot hold the answer: not even counted.
                    const u64 w = token_weight(x, m, inv_t, scale);
                    if (w == 0) continue;
                    bins[b * nt + tid] += w;
                }
                cnts[b * nt + tid] += 1;
            }
            __syncthreads();
            // Bin b's column is summed by the nt / SAMPLE_BINS threads b * group .. (b + 1) * group - 1.
            const u32 group = nt / SAMPLE_BINS, b = tid / group, c = tid % group;
            u64 s = 0;
            u32 n = 0;
            for (u32 j = 0; j < SAMPLE_BINS; j++) {
                if (WEIGHTED) s += bins[b * nt + c + group * j];
                n += cnts[b * nt + c + group * j];
            }
            if (!WEIGHTED) s = n;
            for (u32 o = min(group, 32u) / 2; o > 0; o >>= 1) {
                s += __shfl_xor_sync(FULL_MASK, s, o);
                n += __shfl_xor_sync(FULL_MASK, n, o);
            }
            if (group <= 32) {
                if (c == 0) {
                    sh.bin_sum[b] = s;
                    sh.bin_cnt[b] = n;
                }
            } else {
                if (lane == 0) {
                    sh.part[warp] = s;
                    sh.part_cnt[warp] = n;
                }
                __syncthreads();
                if (tid < SAMPLE_BINS) {
                    const u32 per = group / 32;
                    u64 t = 0;
                    u32 tn = 0;
                    for (u32 w = 0; w < per; w++) {
                        t += sh.part[tid * per + w];
                        tn += sh.part_cnt[tid * per + w];
                    }
                    sh.bin_sum[tid] = t;
                    sh.bin_cnt[tid] = tn;
                }
            }
            __syncthreads();
            if (tid == 0) {
                if (sh.target < 0.0) {
                    u64 total = 0;
                    for (int j = 0; j < SAMPLE_BINS; j++) total += sh.bin_sum[j];
                    sh.target = __dmul_rn(target_or_p, __ull2double_rn(total));
                }
                u64 cum = sh.above;
                int pick = SAMPLE_BINS - 1;
                for (; pick > 0; pick--) {
                    if (__ull2double_rn(cum + sh.bin_sum[pick]) >= sh.target) break;
                    cum += sh.bin_sum[pick];
                }
                sh.above = cum;
                sh.prefix = (prefix << SAMPLE_BINS_LOG2) | (u32)pick;
                sh.bits = bits + SAMPLE_BINS_LOG2;
                if (bits + SAMPLE_BINS_LOG2 == 32) {
                    sh.result = sh.prefix;
                    sh.state = 2;
                } else if (sh.bin_cnt[pick] <= nt) {
                    sh.state = 1;
                }
                sh.n_gathered = 0;
            }
            __syncthreads();
        } else {
            // Gather the bin's tokens (at most nt), sort them by key, largest first, and find the first whose running
            // weight (plus everything above the bin) reaches the target. Equal keys are equal logits and weights, so
            // the order the gather happened to take does not change the answer.
            u64* gw = bins;
            u32* gkey = reinterpret_cast<u32*>(bins + nt);
            gw[tid] = 0;
            gkey[tid] = 0;
            __syncthreads();
            for (u32 i = tid; i < vocab; i += nt) {
                const float x = to_f32(row[i]);
                if (x != x) continue;
                const u32 key = float_key(x);
                if (key < lo || (key >> (32 - bits)) != prefix) continue;
                const u64 w = WEIGHTED ? token_weight(x, m, inv_t, scale) : 1ull;
                if (w == 0) continue;
                const u32 at = atomicAdd(&sh.n_gathered, 1u);
                gkey[at] = key;
                gw[at] = w;
            }
            __syncthreads();
            for (u32 k = 2; k <= nt; k <<= 1) {
                for (u32 j = k >> 1; j > 0; j >>= 1) {
                    const u32 other = tid ^ j;
                    if (other > tid) {
                        const u32 a = gkey[tid], bk = gkey[other];
                        if ((tid & k) == 0 ? a < bk : a > bk) {
                            gkey[tid] = bk;
                            gkey[other] = a;
                            const u64 t = gw[tid];
                            gw[tid] = gw[other];
                            gw[other] = t;
                        }
                    }
                    __syncthreads();
                }
            }
            // Inclusive scan of the weights.
            u64 v = gw[tid];
            for (u32 o = 1; o < 32; o <<= 1) {
                const u64 up = __shfl_up_sync(FULL_MASK, v, o);
                if (lane >= o) v += up;
            }
            if (lane == 31) sh.part[warp] = v;
            __syncthreads();
            if (warp == 0) {
                u64 w = lane < nw ? sh.part[lane] : 0;
                for (u32 o = 1; o < 32; o <<= 1) {
                    const u64 up = __shfl_up_sync(FULL_MASK, w, o);
                    if (lane >= o) w += up;
                }
                sh.part[lane] = w;
            }
            __syncthreads();
            if (warp > 0) v += sh.part[warp - 1];
            const u64 at = sh.above + v, before = at - gw[tid];
            if (__ull2double_rn(at) >= sh.target && !(__ull2double_rn(before) >= sh.target)) sh.result = gkey[tid];
            __syncthreads();
            if (tid == 0) sh.state = 2;
            __syncthreads();
        }
    }
    const u32 result = sh.result;
    __syncthreads();
    return result;
}

// Weight of token i in the kept set (allowed, key >= threshold), else 0.
template <typename T>
__device__ __forceinline__ u64 kept_weight(const T* row, u32 i, u32 threshold, float m, float inv_t, float scale) {
    const float x = to_f32(row[i]);
    if (x != x || float_key(x) < threshold) return 0;
    return token_weight(x, m, inv_t, scale);
}

// Samples row blockIdx.x of `logits` ((rows, vocab), overwritten with NaN at the row's banned ids) into out[row].
//   grid: rows, block: 256 / 512 / 1024, dynamic shared memory: blockDim.x * SAMPLE_SMEM_PER_THREAD
template <typename T>
__device__ void sample_rows(u32* out, T* logits, const SampleParams* params, const u32* banned, u32 vocab, u32 shift) {
    extern __shared__ __align__(16) unsigned char sample_smem[];
    __shared__ SampleShared sh;
    const u32 tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    u64* bins = reinterpret_cast<u64*>(sample_smem);
    u32* cnts = reinterpret_cast<u32*>(bins + SAMPLE_BINS * nt);
    T* row = logits + (u64)blockIdx.x * vocab;
    const SampleParams p = params[blockIdx.x];
    for (u32 j = tid; j < p.banned_len; j += nt) {
        const u32 id = banned[p.banned_start + j];
        if (id < vocab) row[id] = nan_value<T>();
    }
    __syncthreads();

    // 1. Greedy: the largest allowed logit, the lowest id on a tie; and the number of allowed tokens.
    float best = NEG_INF;
    u32 best_i = 0xffffffffu, n_allowed = 0;
    for (u32 i = tid; i < vocab; i += nt) {
        const float x = to_f32(row[i]);
        if (x != x) continue;
        n_allowed++;
        if (argmax_better(x, i, best, best_i)) {
            best = x;
            best_i = i;
        }
    }
    for (u32 o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(FULL_MASK, best, o);
        const u32 i = __shfl_xor_sync(FULL_MASK, best_i, o);
        if (argmax_better(v, i, best, best_i)) {
            best = v;
            best_i = i;
        }
        n_allowed += __shfl_xor_sync(FULL_MASK, n_allowed, o);
    }
    if (lane == 0) {
        sh.best_v[warp] = best;
        sh.best_i[warp] = best_i;
        sh.part_cnt[warp] = n_allowed;
    }
    __syncthreads();
    if (tid == 0) {
        float b = NEG_INF;
        u32 bi = 0xffffffffu, n = 0;
        for (u32 w = 0; w < nw; w++) {
            if (argmax_better(sh.best_v[w], sh.best_i[w], b, bi)) {
                b = sh.best_v[w];
                bi = sh.best_i[w];
            }
            n += sh.part_cnt[w];
        }
        sh.token = bi;
        sh.n_gathered = n;
    }
    __syncthreads();
    best_i = sh.token;
    n_allowed = sh.n_gathered;
    __syncthreads();
    if (best_i == 0xffffffffu) {
        if (tid == 0) out[blockIdx.x] = 0;
        return;
    }
    const float m = to_f32(row[best_i]);
    const float inv_t = __fdiv_rn(1.f, p.temperature);
    if (!(p.temperature > 0.f) || !isfinite(inv_t) || !isfinite(m)) {
        if (tid == 0) out[blockIdx.x] = best_i;
        return;
    }
    const float scale = __uint_as_float((127u + shift) << 23);

    // 2. Top-k, then top-p: the kept set is the allowed tokens with key >= threshold.
    u32 threshold = 0;
    if (p.top_k > 0 && p.top_k < n_allowed)
        threshold = sample_select<T, false>(row, vocab, 0, m, inv_t, scale, (double)p.top_k, sh, bins, cnts);
    if (p.top_p < 1.f)
        threshold = sample_select<T, true>(row, vocab, threshold, m, inv_t, scale, (double)p.top_p, sh, bins, cnts);

    // 3. The draw: r = (word * W) >> 64, then the first kept id whose running weight exceeds r. Narrowed level by
    // level: each warp sums a contiguous range, the range holding r is split again, down to 32 ids, which one warp
    // scans.
    u32 begin = 0, end = vocab;
    u64 r = 0;
    bool first = true;
    while (end - begin > 32) {
        const u32 sub = ((end - begin + nw - 1) / nw + 31) & ~31u;
        const u32 wb = begin + warp * sub, we = min(end, wb + sub);
        u64 s = 0;
        for (u32 i = wb + lane; i < we; i += 32) s += kept_weight(row, i, threshold, m, inv_t, scale);
        for (u32 o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
        if (lane == 0) sh.part[warp] = s;
        __syncthreads();
        if (tid == 0) {
            u64 rr = r;
            if (first) {
                u64 total = 0;
                for (u32 w = 0; w < nw; w++) total += sh.part[w];
                rr = __umul64hi(p.word, total);
            }
            u64 cum = 0;
            u32 w = 0;
            while (w + 1 < nw && cum + sh.part[w] <= rr) cum += sh.part[w++];
            sh.r = rr - cum;
            sh.begin = begin + w * sub;
            sh.end = min(end, begin + (w + 1) * sub);
        }
        __syncthreads();
        r = sh.r;
        begin = sh.begin;
        end = sh.end;
        first = false;
        __syncthreads();
    }
    if (warp == 0) {
        if (first) {  // a row of at most 32 tokens
            u64 s = begin + lane < end ? kept_weight(row, begin + lane, threshold, m, inv_t, scale) : 0;
            for (u32 o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
            r = __umul64hi(p.word, s);
        }
        u64 v = begin + lane < end ? kept_weight(row, begin + lane, threshold, m, inv_t, scale) : 0;
        for (u32 o = 1; o < 32; o <<= 1) {
            const u64 up = __shfl_up_sync(FULL_MASK, v, o);
            if (lane >= o) v += up;
        }
        const u32 hit = __ballot_sync(FULL_MASK, v > r);
        if (lane == 0) out[blockIdx.x] = hit ? begin + __ffs(hit) - 1 : best_i;
    }
}

#define INSTANTIATE_SAMPLE(SUFFIX, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(1024) sample_##SUFFIX(u32* out, T* logits, const SampleParams* params, \
                                                                       const u32* banned, u32 vocab, u32 shift) {    \
        sample_rows<T>(out, logits, params, banned, vocab, shift);                                                    \
    }
INSTANTIATE_SAMPLE(f32, float)
INSTANTIATE_SAMPLE(bf16, __nv_bfloat16)

// Copies whole KV blocks of one layer into another pool (a peer GPU's, mapped through CUDA IPC): block pairs[2k] of
// the source goes to block pairs[2k + 1] of the destination, one thread block per pair, in 16-byte words. One launch
// per layer instead of a copy per run of blocks: a fragmented pool would otherwise cost thousands of small DMA copies.
extern "C" __global__ void copy_kv_blocks(uint4* dst_layer, const uint4* src_layer, const u32* pairs, u64 block_words) {
    const u64 src = pairs[2 * blockIdx.x] * block_words, dst = pairs[2 * blockIdx.x + 1] * block_words;
    for (u64 i = threadIdx.x; i < block_words; i += blockDim.x) dst_layer[dst + i] = src_layer[src + i];
}

// The same between pools that split the KV heads differently (tensor parallelism at other degrees): of each of the
// 2 × block_size rows (K then V) of a source block, `copy_words` 16-byte words from word `src_off` go to word
// `dst_off` of the same row of the destination block. Rows are src_row_words and dst_row_words long.
extern "C" __global__ void copy_kv_heads(uint4* dst_layer, const uint4* src_layer, const u32* pairs, u32 rows,
                                         u32 src_row_words, u32 dst_row_words, u32 src_off, u32 dst_off,
                                         u32 copy_words) {
    const u64 src = (u64)pairs[2 * blockIdx.x] * rows * src_row_words + src_off;
    const u64 dst = (u64)pairs[2 * blockIdx.x + 1] * rows * dst_row_words + dst_off;
    for (u32 i = threadIdx.x; i < rows * copy_words; i += blockDim.x) {
        const u32 r = i / copy_words, w = i - r * copy_words;
        dst_layer[dst + (u64)r * dst_row_words + w] = src_layer[src + (u64)r * src_row_words + w];
    }
}

// out(m, n) = x(m, k) · w(n, k)ᵀ in bf16 for the few rows of a decode step (m <= 8), where cuBLAS reaches ~80% of
// HBM bandwidth at best and less on the smaller matrices of a layer. The weight is read once, as a stream: each
// warp takes GEMV_ROWS rows of w, each lane 16-byte words of them (8 elements) 32 words apart, GEMV_UNROLL words per
// row in flight before any arithmetic; x (a few KiB, L1-resident) is read beside them and serves every row of the
// warp. f32 accumulation, one warp reduction per output at the end. k % 8 == 0.
//   grid: ceil(n / (GEMV_WARPS * GEMV_ROWS)), block: GEMV_WARPS * 32
#define GEMV_WARPS 4
#define GEMV_ROWS 2
#define GEMV_UNROLL 4
template <int M>
__device__ void gemv(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, u32 n, u32 k) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 row0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    if (row0 >= n) return;
    u32 k8 = k / 8;
    const uint4* wr[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) wr[r] = reinterpret_cast<const uint4*>(w + (u64)min(row0 + r, n - 1) * k);
    const uint4* xw = reinterpret_cast<const uint4*>(x);
    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
#pragma unroll
        for (int m = 0; m < M; m++) acc[r][m] = 0.f;
    }
    for (u32 c0 = lane; c0 < k8; c0 += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL][GEMV_ROWS];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            u32 c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) wv[u][r] = c < k8 ? __ldcs(wr[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            u32 c = c0 + 32 * u;
            if (c >= k8) break;
            float wf[GEMV_ROWS][8];
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                Pack8<__nv_bfloat16> pw;
                pw.w[0] = wv[u][r];
                unpack8(pw, wf[r]);
            }
#pragma unroll
            for (int m = 0; m < M; m++) {
                Pack8<__nv_bfloat16> px;
                px.w[0] = __ldg(xw + (u64)m * k8 + c);
                float xf[8];
                unpack8(px, xf);
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) {
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[r][m] += wf[r][i] * xf[i];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
#pragma unroll
        for (int m = 0; m < M; m++) acc[r][m] = warp_sum(acc[r][m]);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (row0 + r >= n) break;
#pragma unroll
            for (int m = 0; m < M; m++) out[(u64)m * n + row0 + r] = __float2bfloat16(acc[r][m]);
        }
    }
}

#define INSTANTIATE_GEMV(M)                                                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                    \
        gemv_m##M##_bf16(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, u32 n, u32 k) {        \
        gemv<M>(out, x, w, n, k);                                                                                   \
    }
INSTANTIATE_GEMV(1)
INSTANTIATE_GEMV(2)
INSTANTIATE_GEMV(3)
INSTANTIATE_GEMV(4)
INSTANTIATE_GEMV(5)
INSTANTIATE_GEMV(6)
INSTANTIATE_GEMV(7)
INSTANTIATE_GEMV(8)

// Streams `n` 16-byte words: the bandwidth ceiling the benchmarks report against.
extern "C" __global__ void copy_u128(uint4* dst, const uint4* src, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = src[i];
}

#define INSTANTIATE(SUFFIX, T)                                                                                        \
    extern "C" __global__ void embed_##SUFFIX(T* out, const T* table, const u32* ids, u32 cols) { embed(out, table, ids, cols); } \
    extern "C" __global__ void rms_norm_##SUFFIX(T* out, const T* x, const T* w, float eps, u32 cols) { rms_norm(out, x, w, eps, cols); } \
    extern "C" __global__ void add_rms_norm_##SUFFIX(T* x, const T* y, const T* w, T* o, float eps, u32 cols) { add_rms_norm(x, y, w, o, eps, cols); } \
    extern "C" __global__ void qkv_rope_kv_##SUFFIX(T* q, const T* qkv, T* layer, const u32* p, const u32* s, const float* f, \
                                                    const T* qn, const T* kn, float eps, u32 nh, u32 nkv, u32 hd, u32 bs) { \
        qkv_rope_kv(q, qkv, layer, p, s, f, qn, kn, eps, nh, nkv, hd, bs);                                          \
    }                                                                                                               \
    extern "C" __global__ void silu_mul_##SUFFIX(T* o, const T* gu, u32 inter, u64 n) { silu_mul(o, gu, inter, n); } \
    extern "C" __global__ void add_bias_##SUFFIX(T* x, const T* b, u64 n, u32 cols) { add_bias(x, b, n, cols); }   \
    extern "C" __global__ void gather_rows_##SUFFIX(T* o, const T* x, const u32* r, u32 cols) { gather_rows(o, x, r, cols); } \
    extern "C" __global__ void to_float_##SUFFIX(float* o, const T* x, u64 n) { to_float(o, x, n); }             \
    extern "C" __global__ void attention_##SUFFIX(T* o, float* part, const T* q, const T* layer, const u32* sr, \
                                                  const uint4* sm, const u32* bt, u32 nh, u32 nkv, u32 hd, u32 bs, float scale) { \
        attention(o, part, q, layer, sr, sm, bt, nh, nkv, hd, bs, scale);                                           \
    }                                                                                                               \
    extern "C" __global__ void attention_merge_##SUFFIX(T* o, const float* part, u32 nh, u32 hd, u32 n_splits) {    \
        attention_merge(o, part, nh, hd, n_splits);                                                                 \
    }

#define INSTANTIATE_GQA(SUFFIX, T, G)                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32, (G) <= 4 ? 2 : 1)                                 \
        attention_gqa##G##_##SUFFIX(T* o, float* part, const T* q, const T* layer, const u32* sr, const uint4* sm,    \
                                    const u32* bt, u32 nh, u32 nkv, u32 hd, u32 bs, float scale) {                    \
        attention_gqa<T, G>(o, part, q, layer, sr, sm, bt, nh, nkv, hd, bs, scale);                                 \
    }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, __nv_bfloat16)
INSTANTIATE_GQA(f32, float, 1)
INSTANTIATE_GQA(f32, float, 2)
INSTANTIATE_GQA(f32, float, 3)
INSTANTIATE_GQA(f32, float, 4)
INSTANTIATE_GQA(f32, float, 5)
INSTANTIATE_GQA(f32, float, 6)
INSTANTIATE_GQA(f32, float, 7)
INSTANTIATE_GQA(f32, float, 8)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 1)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 2)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 3)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 4)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 5)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 6)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 7)
INSTANTIATE_GQA(bf16, __nv_bfloat16, 8)
