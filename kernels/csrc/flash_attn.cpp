// Python binding for the CUDA flash attention in flash_attn.cu.
//
// fwd(q, k, v, causal, scale) -> (out, lse)
//   q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] on one CUDA device, same dtype (fp32/fp16/bf16),
//   D <= flash_max_head_dim(); out has q's shape and dtype, lse is fp32 [B, Hq, Tq].
// bwd(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv), each in its input's dtype.
// Inputs are made contiguous here; every check fails with a message naming the argument.

#include <torch/extension.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS headers that a
// minimal CUDA toolkit may not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

int flash_max_head_dim();
cudaError_t flash_fwd(int dtype, const void* q, const void* k, const void* v, void* o, float* lse, int B,
                      int Hq, int Hkv, int Tq, int Tk, int D, float scale, bool causal, cudaStream_t stream);
cudaError_t flash_bwd(int dtype, const void* q, const void* k, const void* v, const void* dout,
                      const float* lse, const float* delta, float* dq, float* dk, float* dv, int B, int Hq,
                      int Hkv, int Tq, int Tk, int D, float scale, bool causal, cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "flash_attn: dtype must be float32/float16/bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "flash_attn: q, k, v must be CUDA tensors");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "flash_attn: q, k, v on different devices");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flash_attn: q, k, v must be [B, H, T, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "flash_attn: k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "flash_attn: q and k disagree on B or D");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "flash_attn: Hq must be a multiple of Hkv");
  TORCH_CHECK(q.size(3) <= flash_max_head_dim(), "flash_attn: head dim ", q.size(3), " > ",
              flash_max_head_dim());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flash_attn: q, k, v dtypes differ");
}

std::vector<at::Tensor> fwd(at::Tensor q, at::Tensor k, at::Tensor v, bool causal, double scale) {
  check_qkv(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  auto err = flash_fwd(dtype_code(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                       lse.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3),
                       (float)scale, causal, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "flash_attn fwd launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::vector<at::Tensor> bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                            at::Tensor lse, bool causal, double scale) {
  check_qkv(q, k, v);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "flash_attn: dout/out must match q");
  const c10::cuda::CUDAGuard guard(q.device());
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  dout = dout.contiguous().to(q.scalar_type());
  lse = lse.contiguous();
  // delta_i = sum_d dO[i, d] * O[i, d]: the softmax-backward term shared by a whole query row.
  auto delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();  // [B, Hq, Tq]
  auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::empty(q.sizes(), f32), dk = at::empty(k.sizes(), f32), dv = at::empty(v.sizes(), f32);
  auto err = flash_bwd(dtype_code(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(),
                       lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
                       dk.data_ptr<float>(), dv.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2),
                       k.size(2), q.size(3), (float)scale, causal, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "flash_attn bwd launch failed: ", cudaGetErrorString(err));
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Flash attention forward/backward (tiled, online softmax) for [B, H, T, D] tensors";
  m.def("fwd", &fwd, "flash attention forward -> (out, lse)");
  m.def("bwd", &bwd, "flash attention backward -> (dq, dk, dv)");
  m.def("max_head_dim", &flash_max_head_dim, "largest supported head dim");
}
