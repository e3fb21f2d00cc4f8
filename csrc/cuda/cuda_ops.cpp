// CUDA implementations of the torch.ops.mtlfast ops. Compiled by the host compiler against the
// torch headers only (no CUDA headers, see DESIGN.md): the current stream comes through the
// device-agnostic guard interface, the kernels through the C launchers in launchers.h.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "launchers.h"

namespace mtlfast {
namespace {

void* current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(t.device()).native_handle();
}

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return MTLFAST_F32;
    case at::kHalf: return MTLFAST_F16;
    case at::kBFloat16: return MTLFAST_BF16;
    default: TORCH_CHECK(false, op, ": CUDA kernel takes float32/float16/bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

void check(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed with cudaError ", err);
}

at::Tensor gram_cuda(const at::Tensor& G_in) {
  TORCH_CHECK(G_in.dim() == 2, "gram: G must be 2-D (T, P), got ", G_in.dim(), " dims");
  TORCH_CHECK(G_in.size(0) > 0 && G_in.size(1) > 0, "gram: G must have T > 0 and P > 0");
  if (G_in.scalar_type() == at::kDouble) {
    // No fp64 kernel: the reference is exact and fp64 Grams are for tests.
    return at::mm(G_in, G_in.t());
  }
  c10::OptionalDeviceGuard guard(G_in.device());
  at::Tensor G = G_in.stride(1) == 1 ? G_in : G_in.contiguous();
  const int code = dtype_code(G, "gram");
  const int64_t T = G.size(0), P = G.size(1);
  at::Tensor K = at::empty({T, T}, G.options().dtype(at::kFloat));
  at::Tensor ws = at::empty({mtlfast_cuda_gram_workspace(T, P)}, K.options());
  check(mtlfast_cuda_gram(G.data_ptr(), code, T, P, G.stride(0), K.data_ptr<float>(),
                          ws.data_ptr<float>(), current_stream(G)),
        "gram");
  return K;
}

void combine_cuda(const at::Tensor& w, const at::Tensor& G_in, at::Tensor& out, bool accumulate,
                  double scale) {
  TORCH_CHECK(G_in.dim() == 2, "combine: G must be 2-D (T, P)");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == G_in.size(0), "combine: w must have length T");
  TORCH_CHECK(out.dim() == 1 && out.size(0) == G_in.size(1) && out.is_contiguous(),
              "combine: out must be a contiguous 1-D tensor of length P");
  TORCH_CHECK(out.scalar_type() == G_in.scalar_type(), "combine: out dtype differs from G");
  c10::OptionalDeviceGuard guard(G_in.device());
  if (G_in.scalar_type() == at::kDouble) {
    at::Tensor r = at::mv(G_in.t(), w.to(at::kDouble)).mul_(scale);
    if (accumulate) out.add_(r); else out.copy_(r);
    return;
  }
  at::Tensor G = G_in.stride(1) == 1 ? G_in : G_in.contiguous();
  at::Tensor wf = w.to(at::kFloat).contiguous();
  check(mtlfast_cuda_combine(wf.data_ptr<float>(), G.data_ptr(), dtype_code(G, "combine"),
                             G.size(0), G.size(1), G.stride(0), out.data_ptr(), accumulate ? 1 : 0,
                             static_cast<float>(scale), current_stream(G)),
        "combine");
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("combine_", &combine_cuda);
}

}  // namespace mtlfast
