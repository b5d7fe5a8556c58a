// Flash attention forward and backward for CUDA (tiled, online softmax, fp32 accumulation).
//
// Layout: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], all contiguous; Hq % Hkv == 0 (GQA: q head h reads
// kv head h / (Hq / Hkv)). Causal masking is bottom-right aligned: query i may see key j iff
// j <= i + (Tk - Tq). A query with no visible key gets output 0 and lse 0.
// The forward also writes lse [B, Hq, Tq] (fp32), the log-sum-exp the backward needs to rebuild the
// probabilities without storing them. The backward takes delta = rowsum(dO * O) [B, Hq, Tq] (fp32)
// and writes fp32 gradients; the C++ binding casts them back to the input dtype.
//
// The file includes no torch header so nvcc compiles it in seconds; flash_attn.cpp holds the binding.
// emulate_host.cpp compiles the kernels (not the launchers) for the CPU to test them without a GPU.
// One thread owns one query row (forward, dq) or one key row (dk, dv); tiles of the other side are
// staged in shared memory. Head dims up to kMaxD are supported with one code path (no per-D templates).

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>

namespace {

constexpr int kMaxD = 128;  // largest head dim; per-thread row buffers are this long
constexpr int kRows = 64;   // query rows per block (one per thread)
constexpr int kCols = 32;   // keys staged in shared memory per step

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Copy rows [r0, r0 + n) of a [T, D] matrix into shared memory as fp32, zero-filling past T.
template <typename T>
__device__ void stage_rows(float* dst, const T* src, int r0, int n, int T_len, int D) {
  for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
    int r = r0 + idx / D;
    dst[idx] = r < T_len ? to_f(src[(size_t)r * D + idx % D]) : 0.f;
  }
}

template <typename T>
__global__ void fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, float* __restrict__ lse, int Hq, int Hkv, int Tq, int Tk,
                           int D, float scale, bool causal) {
  extern __shared__ float smem[];
  float* ks = smem;              // [kCols, D]
  float* vs = smem + kCols * D;  // [kCols, D]
  const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, hk = h / (Hq / Hkv);
  const int i = blockIdx.x * kRows + threadIdx.x;
  const bool row_ok = i < Tq;
  const int offset = Tk - Tq;
  const T* qb = q + ((size_t)(b * Hq + h) * Tq) * D;
  const T* kb = k + ((size_t)(b * Hkv + hk) * Tk) * D;
  const T* vb = v + ((size_t)(b * Hkv + hk) * Tk) * D;

  float qr[kMaxD], acc[kMaxD], sc[kCols];
  for (int d = 0; d < D; ++d) {
    qr[d] = row_ok ? to_f(qb[(size_t)i * D + d]) * scale : 0.f;
    acc[d] = 0.f;
  }
  float m = -CUDART_INF_F, l = 0.f;
  // Keys past the last row's causal limit are never needed by this block.
  int kv_end = Tk;
  if (causal) kv_end = min(Tk, max(0, (int)(blockIdx.x + 1) * kRows + offset));

  for (int j0 = 0; j0 < kv_end; j0 += kCols) {
    __syncthreads();  // the previous tile is no longer read
    stage_rows(ks, kb, j0, kCols, Tk, D);
    stage_rows(vs, vb, j0, kCols, Tk, D);
    __syncthreads();
    if (!row_ok) continue;
    float m_tile = -CUDART_INF_F;
    for (int jj = 0; jj < kCols; ++jj) {
      const int j = j0 + jj;
      float s = -CUDART_INF_F;
      if (j < Tk && !(causal && j > i + offset)) {
        s = 0.f;
        for (int d = 0; d < D; ++d) s += qr[d] * ks[jj * D + d];
      }
      sc[jj] = s;
      m_tile = fmaxf(m_tile, s);
    }
    const float m_new = fmaxf(m, m_tile);
    if (m_new == -CUDART_INF_F) continue;  // nothing visible yet: avoid inf - inf
    const float corr = __expf(m - m_new);
    l *= corr;
    for (int d = 0; d < D; ++d) acc[d] *= corr;
    for (int jj = 0; jj < kCols; ++jj) {
      const float p = __expf(sc[jj] - m_new);
      l += p;
      for (int d = 0; d < D; ++d) acc[d] += p * vs[jj * D + d];
    }
    m = m_new;
  }
  if (!row_ok) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* ob = o + ((size_t)(b * Hq + h) * Tq + i) * D;
  for (int d = 0; d < D; ++d) ob[d] = from_f<T>(acc[d] * inv);
  lse[(size_t)(b * Hq + h) * Tq + i] = l > 0.f ? m + logf(l) : 0.f;
}

// dq: one thread per query row, walking over key tiles.
template <typename T>
__global__ void bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const T* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ delta, float* __restrict__ dq, int Hq, int Hkv,
                              int Tq, int Tk, int D, float scale, bool causal) {
  extern __shared__ float smem[];
  float* ks = smem;
  float* vs = smem + kCols * D;
  const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, hk = h / (Hq / Hkv);
  const int i = blockIdx.x * kRows + threadIdx.x;
  const bool row_ok = i < Tq;
  const int offset = Tk - Tq;
  const size_t row = (size_t)(b * Hq + h) * Tq + i;
  const T* kb = k + ((size_t)(b * Hkv + hk) * Tk) * D;
  const T* vb = v + ((size_t)(b * Hkv + hk) * Tk) * D;

  float qr[kMaxD], dor[kMaxD], acc[kMaxD];
  for (int d = 0; d < D; ++d) {
    qr[d] = row_ok ? to_f(q[row * D + d]) : 0.f;
    dor[d] = row_ok ? to_f(dout[row * D + d]) : 0.f;
    acc[d] = 0.f;
  }
  const float lse_i = row_ok ? lse[row] : 0.f, delta_i = row_ok ? delta[row] : 0.f;
  int kv_end = Tk;
  if (causal) kv_end = min(Tk, max(0, (int)(blockIdx.x + 1) * kRows + offset));

  for (int j0 = 0; j0 < kv_end; j0 += kCols) {
    __syncthreads();
    stage_rows(ks, kb, j0, kCols, Tk, D);
    stage_rows(vs, vb, j0, kCols, Tk, D);
    __syncthreads();
    if (!row_ok) continue;
    for (int jj = 0; jj < kCols; ++jj) {
      const int j = j0 + jj;
      if (j >= Tk || (causal && j > i + offset)) continue;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) {
        s += qr[d] * ks[jj * D + d];
        dp += dor[d] * vs[jj * D + d];
      }
      const float p = __expf(s * scale - lse_i);
      const float ds = p * (dp - delta_i);
      for (int d = 0; d < D; ++d) acc[d] += ds * ks[jj * D + d];
    }
  }
  if (!row_ok) return;
  for (int d = 0; d < D; ++d) dq[row * D + d] = acc[d] * scale;
}

// dk, dv: one thread per key row of one kv head, walking over the query tiles of every q head that
// shares this kv head (GQA), so no atomics are needed.
template <typename T>
__global__ void bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const T* __restrict__ dout, const float* __restrict__ lse,
                                const float* __restrict__ delta, float* __restrict__ dk,
                                float* __restrict__ dv, int Hq, int Hkv, int Tq, int Tk, int D, float scale,
                                bool causal) {
  extern __shared__ float smem[];
  float* qs = smem;                  // [kCols, D]
  float* dos = smem + kCols * D;     // [kCols, D]
  float* ls = smem + 2 * kCols * D;  // [kCols]
  float* dls = ls + kCols;           // [kCols]
  const int b = blockIdx.y / Hkv, hk = blockIdx.y % Hkv, rep = Hq / Hkv;
  const int j = blockIdx.x * kRows + threadIdx.x;
  const bool col_ok = j < Tk;
  const int offset = Tk - Tq;
  const size_t krow = (size_t)(b * Hkv + hk) * Tk + j;

  float kr[kMaxD], vr[kMaxD], dka[kMaxD], dva[kMaxD];
  for (int d = 0; d < D; ++d) {
    kr[d] = col_ok ? to_f(k[krow * D + d]) : 0.f;
    vr[d] = col_ok ? to_f(v[krow * D + d]) : 0.f;
    dka[d] = 0.f;
    dva[d] = 0.f;
  }
  // Causal: the first query that can see key j is i = j - offset; earlier tiles are skipped.
  int q_start = 0;
  if (causal) q_start = max(0, (int)(blockIdx.x * kRows) - offset) / kCols * kCols;

  for (int r = 0; r < rep; ++r) {
    const int h = hk * rep + r;
    const size_t base = (size_t)(b * Hq + h) * Tq;
    for (int i0 = q_start; i0 < Tq; i0 += kCols) {
      __syncthreads();
      stage_rows(qs, q + base * D, i0, kCols, Tq, D);
      stage_rows(dos, dout + base * D, i0, kCols, Tq, D);
      for (int idx = threadIdx.x; idx < kCols; idx += blockDim.x) {
        ls[idx] = i0 + idx < Tq ? lse[base + i0 + idx] : 0.f;
        dls[idx] = i0 + idx < Tq ? delta[base + i0 + idx] : 0.f;
      }
      __syncthreads();
      if (!col_ok) continue;
      for (int ii = 0; ii < kCols; ++ii) {
        const int i = i0 + ii;
        if (i >= Tq || (causal && j > i + offset)) continue;
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
          s += qs[ii * D + d] * kr[d];
          dp += dos[ii * D + d] * vr[d];
        }
        const float p = __expf(s * scale - ls[ii]);
        const float ds = p * (dp - dls[ii]);
        for (int d = 0; d < D; ++d) {
          dva[d] += p * dos[ii * D + d];
          dka[d] += ds * qs[ii * D + d];
        }
      }
    }
  }
  if (!col_ok) return;
  for (int d = 0; d < D; ++d) {
    dk[krow * D + d] = dka[d] * scale;
    dv[krow * D + d] = dva[d];
  }
}

}  // namespace

// Everything below needs nvcc (launch syntax, CUDA runtime). emulate_host.cpp defines
// FLASH_ATTN_KERNELS_ONLY to compile just the kernels above with a host C++ compiler and run them on
// the CPU, one std::thread per CUDA thread, so their numerics are tested on machines without a GPU.
#ifndef FLASH_ATTN_KERNELS_ONLY
namespace {

template <typename T>
void fwd_launch(const void* q, const void* k, const void* v, void* o, float* lse, int B, int Hq, int Hkv,
                int Tq, int Tk, int D, float scale, bool causal, cudaStream_t stream) {
  dim3 grid((Tq + kRows - 1) / kRows, B * Hq);
  size_t shm = 2 * kCols * D * sizeof(float);
  fwd_kernel<T><<<grid, kRows, shm, stream>>>((const T*)q, (const T*)k, (const T*)v, (T*)o, lse, Hq, Hkv,
                                              Tq, Tk, D, scale, causal);
}

template <typename T>
void bwd_launch(const void* q, const void* k, const void* v, const void* dout, const float* lse,
                const float* delta, float* dq, float* dk, float* dv, int B, int Hq, int Hkv, int Tq, int Tk,
                int D, float scale, bool causal, cudaStream_t stream) {
  dim3 grid_q((Tq + kRows - 1) / kRows, B * Hq);
  bwd_dq_kernel<T><<<grid_q, kRows, 2 * kCols * D * sizeof(float), stream>>>(
      (const T*)q, (const T*)k, (const T*)v, (const T*)dout, lse, delta, dq, Hq, Hkv, Tq, Tk, D, scale,
      causal);
  dim3 grid_k((Tk + kRows - 1) / kRows, B * Hkv);
  bwd_dkdv_kernel<T><<<grid_k, kRows, (2 * kCols * D + 2 * kCols) * sizeof(float), stream>>>(
      (const T*)q, (const T*)k, (const T*)v, (const T*)dout, lse, delta, dk, dv, Hq, Hkv, Tq, Tk, D, scale,
      causal);
}

}  // namespace

// dtype codes shared with flash_attn.cpp: 0 = float32, 1 = float16, 2 = bfloat16.
int flash_max_head_dim() { return kMaxD; }

cudaError_t flash_fwd(int dtype, const void* q, const void* k, const void* v, void* o, float* lse, int B,
                      int Hq, int Hkv, int Tq, int Tk, int D, float scale, bool causal, cudaStream_t stream) {
  switch (dtype) {
    case 0: fwd_launch<float>(q, k, v, o, lse, B, Hq, Hkv, Tq, Tk, D, scale, causal, stream); break;
    case 1: fwd_launch<__half>(q, k, v, o, lse, B, Hq, Hkv, Tq, Tk, D, scale, causal, stream); break;
    case 2: fwd_launch<__nv_bfloat16>(q, k, v, o, lse, B, Hq, Hkv, Tq, Tk, D, scale, causal, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t flash_bwd(int dtype, const void* q, const void* k, const void* v, const void* dout,
                      const float* lse, const float* delta, float* dq, float* dk, float* dv, int B, int Hq,
                      int Hkv, int Tq, int Tk, int D, float scale, bool causal, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      bwd_launch<float>(q, k, v, dout, lse, delta, dq, dk, dv, B, Hq, Hkv, Tq, Tk, D, scale, causal, stream);
      break;
    case 1:
      bwd_launch<__half>(q, k, v, dout, lse, delta, dq, dk, dv, B, Hq, Hkv, Tq, Tk, D, scale, causal, stream);
      break;
    case 2:
      bwd_launch<__nv_bfloat16>(q, k, v, dout, lse, delta, dq, dk, dv, B, Hq, Hkv, Tq, Tk, D, scale, causal,
                                stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
#endif  // FLASH_ATTN_KERNELS_ONLY
