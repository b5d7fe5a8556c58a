// Runs the CUDA flash attention kernels of flash_attn.cu on the CPU, for tests on machines without a GPU.
//
// Build: c++ -std=c++20 -O2 -I$CUDA_HOME/include emulate_host.cpp -o emulate_host -lpthread
// Usage: emulate_host IN OUT
//   IN : int32 B, Hq, Hkv, Tq, Tk, D, causal, dtype (0 fp32, 1 fp16, 2 bf16); float32 scale; then
//        float32 q [B,Hq,Tq,D], k [B,Hkv,Tk,D], v [B,Hkv,Tk,D], dout [B,Hq,Tq,D] (rounded to dtype here).
//   OUT: float32 out [B,Hq,Tq,D], lse [B,Hq,Tq], dq, dk, dv (input shapes).
// Each CUDA block runs as kRows std::threads sharing one shared-memory array; __syncthreads is a
// std::barrier, so the cooperative tile loads and the per-thread math are the kernels' own code.
// Blocks run one after another. Only the launch wrappers (nvcc-only syntax) are left out.

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>

// Host stand-ins for the CUDA built-ins the kernels use.
#undef CUDART_INF_F
#define CUDART_INF_F INFINITY
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__
#define __expf expf
struct EmuIdx {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuIdx emu_thread;
EmuIdx emu_block, emu_dim;
thread_local std::barrier<>* emu_barrier;
#define threadIdx emu_thread
#define blockIdx emu_block
#define blockDim emu_dim
#define __syncthreads() emu_barrier->arrive_and_wait()
using std::max;
using std::min;
namespace {
float smem[1 << 16];  // the block's dynamic shared memory (blocks run one at a time)
}

#define FLASH_ATTN_KERNELS_ONLY
#include "flash_attn.cu"

namespace {

template <class F>
void launch(int grid_x, int grid_y, int threads, F kernel) {
  emu_dim.x = threads;
  for (int y = 0; y < grid_y; ++y) {
    for (int x = 0; x < grid_x; ++x) {
      emu_block.x = x;
      emu_block.y = y;
      std::barrier<> bar(threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          emu_thread.x = t;
          emu_barrier = &bar;
          kernel();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

template <typename T>
std::vector<T> read_as(FILE* in, size_t n, bool& ok) {
  std::vector<float> buf(n);
  ok = ok && fread(buf.data(), sizeof(float), n, in) == n;
  std::vector<T> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = from_f<T>(buf[i]);
  return out;
}

template <typename T>
int run(FILE* in, FILE* out, int B, int Hq, int Hkv, int Tq, int Tk, int D, bool causal, float scale) {
  const size_t nq = (size_t)B * Hq * Tq * D, nk = (size_t)B * Hkv * Tk * D, nrow = (size_t)B * Hq * Tq;
  bool ok = true;
  auto q = read_as<T>(in, nq, ok), k = read_as<T>(in, nk, ok), v = read_as<T>(in, nk, ok);
  auto dout = read_as<T>(in, nq, ok);
  if (!ok) return 2;
  std::vector<T> o(nq);
  std::vector<float> lse(nrow), delta(nrow, 0.f), dq(nq), dk(nk), dv(nk), of(nq);
  launch((Tq + kRows - 1) / kRows, B * Hq, kRows, [&] {
    fwd_kernel<T>(q.data(), k.data(), v.data(), o.data(), lse.data(), Hq, Hkv, Tq, Tk, D, scale, causal);
  });
  // delta = rowsum(dO * O), computed like the binding does before the backward kernels.
  for (size_t r = 0; r < nrow; ++r)
    for (int d = 0; d < D; ++d) delta[r] += to_f(dout[r * D + d]) * to_f(o[r * D + d]);
  launch((Tq + kRows - 1) / kRows, B * Hq, kRows, [&] {
    bwd_dq_kernel<T>(q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), dq.data(), Hq, Hkv,
                     Tq, Tk, D, scale, causal);
  });
  launch((Tk + kRows - 1) / kRows, B * Hkv, kRows, [&] {
    bwd_dkdv_kernel<T>(q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), dk.data(),
                       dv.data(), Hq, Hkv, Tq, Tk, D, scale, causal);
  });
  for (size_t i = 0; i < nq; ++i) of[i] = to_f(o[i]);
  for (const auto* vec : {&of, &lse, &dq, &dk, &dv}) fwrite(vec->data(), sizeof(float), vec->size(), out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 1;
  }
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) return 1;
  int h[8];
  float scale;
  if (fread(h, sizeof(int), 8, in) != 8 || fread(&scale, sizeof(float), 1, in) != 1) return 2;
  if (h[5] > kMaxD) return 3;
  int rc;
  switch (h[7]) {
    case 0: rc = run<float>(in, out, h[0], h[1], h[2], h[3], h[4], h[5], h[6], scale); break;
    case 1: rc = run<__half>(in, out, h[0], h[1], h[2], h[3], h[4], h[5], h[6], scale); break;
    case 2: rc = run<__nv_bfloat16>(in, out, h[0], h[1], h[2], h[3], h[4], h[5], h[6], scale); break;
    default: rc = 4;
  }
  fclose(in);
  fclose(out);
  return rc;
}
