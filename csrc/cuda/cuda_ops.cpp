// CUDA implementations of the torch.ops.mtlfast ops. Compiled by the host compiler against the
// torch headers only (no CUDA headers, see DESIGN.md): the current stream comes through the
// device-agnostic guard interface, the kernels through the C launchers in launchers.h.
// combine_ and graddrop have no C++ CPU kernel (on the CPU, BLAS gemv and the torch reference
// in mtlfast/ops serve them), so their schemas are defined here, where their only kernels are.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

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

// Rows of G with unit column stride (a (T, P) slice of a wider tensor stays as it is).
at::Tensor unit_col_stride(const at::Tensor& G) {
  return G.stride(1) == 1 && G.stride(0) >= G.size(1) ? G : G.contiguous();
}

at::Tensor gram_cuda(const at::Tensor& G_in) {
  TORCH_CHECK(G_in.dim() == 2, "gram: G must be 2-D (T, P), got ", G_in.dim(), " dims");
  TORCH_CHECK(G_in.size(0) > 0 && G_in.size(1) > 0, "gram: G must have T > 0 and P > 0");
  if (G_in.scalar_type() == at::kDouble) {
    // No fp64 kernel: the reference is exact and fp64 Grams are for tests.
    return at::mm(G_in, G_in.t());
  }
  c10::OptionalDeviceGuard guard(G_in.device());
  at::Tensor G = unit_col_stride(G_in);
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
                  double scale, const std::optional<at::Tensor>& scale_tensor) {
  TORCH_CHECK(G_in.dim() == 2, "combine: G must be 2-D (T, P)");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == G_in.size(0), "combine: w must have length T");
  TORCH_CHECK(out.dim() == 1 && out.size(0) == G_in.size(1) && out.is_contiguous(),
              "combine: out must be a contiguous 1-D tensor of length P");
  TORCH_CHECK(out.scalar_type() == G_in.scalar_type(), "combine: out dtype differs from G");
  TORCH_CHECK(!scale_tensor || scale_tensor->numel() == 1,
              "combine: scale_tensor must hold one element");
  c10::OptionalDeviceGuard guard(G_in.device());
  if (G_in.scalar_type() == at::kDouble || G_in.size(0) > 1024) {
    at::Tensor r = at::mv(G_in.t().to(at::kDouble), w.to(at::kDouble)).mul_(scale);
    if (scale_tensor) r.mul_(scale_tensor->to(r.device(), at::kDouble).reshape({}));
    if (accumulate) out.add_(r.to(out.scalar_type())); else out.copy_(r);
    return;
  }
  at::Tensor G = unit_col_stride(G_in);
  at::Tensor wf = w.to(G.device(), at::kFloat).contiguous();
  at::Tensor sf;
  if (scale_tensor) sf = scale_tensor->to(G.device(), at::kFloat).contiguous();
  check(mtlfast_cuda_combine(wf.data_ptr<float>(), G.data_ptr(), dtype_code(G, "combine"),
                             G.size(0), G.size(1), G.stride(0), out.data_ptr(), accumulate ? 1 : 0,
                             static_cast<float>(scale),
                             scale_tensor ? sf.data_ptr<float>() : nullptr, current_stream(G)),
        "combine");
}

at::Tensor graddrop_cuda(const at::Tensor& G_in, const at::Tensor& u_in,
                         const std::optional<at::Tensor>& leak_in) {
  TORCH_CHECK(G_in.dim() == 2 && G_in.size(0) > 0 && G_in.size(1) > 0,
              "graddrop: G must be 2-D (T, P) with T > 0 and P > 0, got ", G_in.sizes());
  TORCH_CHECK(u_in.dim() == 1 && u_in.size(0) == G_in.size(1) && u_in.device() == G_in.device(),
              "graddrop: u must be 1-D of length P=", G_in.size(1), " on G's device, got ",
              u_in.sizes(), " on ", u_in.device());
  TORCH_CHECK(!leak_in || (leak_in->dim() == 1 && leak_in->size(0) == G_in.size(0) &&
                           leak_in->device() == G_in.device()),
              "graddrop: leak must be 1-D of length T=", G_in.size(0), " on G's device");
  c10::OptionalDeviceGuard guard(G_in.device());
  at::Tensor G = unit_col_stride(G_in);
  at::Tensor u = u_in.to(at::kFloat).contiguous();
  at::Tensor leak;
  if (leak_in) leak = leak_in->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({G.size(1)}, G.options());
  check(mtlfast_cuda_graddrop(G.data_ptr(), dtype_code(G, "graddrop"), G.size(0), G.size(1),
                              G.stride(0), u.data_ptr<float>(),
                              leak_in ? leak.data_ptr<float>() : nullptr, out.data_ptr(),
                              current_stream(G)),
        "graddrop");
  return out;
}

at::Tensor pcgrad_cuda(const at::Tensor& K_in, const at::Tensor& orders_in) {
  TORCH_CHECK(K_in.dim() >= 2 && K_in.size(-1) == K_in.size(-2),
              "pcgrad: K must have shape (..., T, T), got ", K_in.sizes());
  TORCH_CHECK(K_in.scalar_type() == at::kDouble, "pcgrad: K must be float64");
  TORCH_CHECK(orders_in.scalar_type() == at::kLong && orders_in.sizes() == K_in.sizes(),
              "pcgrad: orders must be int64 with K's shape");
  TORCH_CHECK(orders_in.device() == K_in.device(), "pcgrad: orders and K on different devices");
  const int64_t T = K_in.size(-1);
  TORCH_CHECK(T <= 64, "pcgrad: the CUDA kernel takes T <= 64, got ", T);
  c10::OptionalDeviceGuard guard(K_in.device());
  at::Tensor K = K_in.contiguous(), orders = orders_in.contiguous();
  at::Tensor C = at::empty_like(K, at::MemoryFormat::Contiguous);
  const int64_t batch = T == 0 ? 0 : K.numel() / (T * T);
  if (batch == 0) return C;
  check(mtlfast_cuda_pcgrad(K.data_ptr<double>(), orders.data_ptr<int64_t>(), batch, T,
                            C.data_ptr<double>(), current_stream(K)),
        "pcgrad");
  return C;
}

at::Tensor pcgrad_orders_cuda(at::Tensor& state, int64_t batch, int64_t T) {
  TORCH_CHECK(state.dim() == 1 && state.numel() == 2 && state.scalar_type() == at::kLong &&
                  state.is_contiguous(),
              "pcgrad_orders: state must be a contiguous int64 tensor [seed, step]");
  TORCH_CHECK(batch >= 1 && batch <= 0xFFFFFFFFll && T >= 1 && T <= 0x7FFFFFFFll,
              "pcgrad_orders: batch in [1, 2^32) and T >= 1 expected, got ", batch, " and ", T);
  c10::OptionalDeviceGuard guard(state.device());
  at::Tensor orders = at::empty({batch, T, T}, state.options());
  check(mtlfast_cuda_pcgrad_orders(state.data_ptr<int64_t>(), batch, T,
                                   orders.data_ptr<int64_t>(), current_stream(state)),
        "pcgrad_orders");
  return orders;
}

// Checks shared by the solver ops: float64, on one CUDA device, T in [1, 64].
void check_solver_input(const at::Tensor& t, const char* op, const char* name, int64_t dim_min) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() >= dim_min, op, ": ", name, " must have at least ", dim_min,
              " dims, got ", t.sizes());
}

int64_t solver_T(const at::Tensor& K, const char* op) {
  TORCH_CHECK(K.size(-1) == K.size(-2), op, ": K must have shape (..., T, T), got ", K.sizes());
  const int64_t T = K.size(-1);
  TORCH_CHECK(T >= 1 && T <= 64, op, ": the CUDA kernel takes 1 <= T <= 64, got ", T);
  return T;
}

at::Tensor nnqp_cuda(const at::Tensor& A_in, const at::Tensor& b_in, bool simplex, int64_t steps,
                     double tol) {
  check_solver_input(A_in, "nnqp", "A", 2);
  check_solver_input(b_in, "nnqp", "b", 2);
  const int64_t T = solver_T(A_in, "nnqp");
  TORCH_CHECK(b_in.dim() == A_in.dim() && b_in.size(-1) == T &&
                  b_in.sizes().slice(0, b_in.dim() - 2) == A_in.sizes().slice(0, A_in.dim() - 2),
              "nnqp: b must have shape (..., m, T) matching A ", A_in.sizes(), ", got ",
              b_in.sizes());
  TORCH_CHECK(b_in.device() == A_in.device(), "nnqp: A and b on different devices");
  c10::OptionalDeviceGuard guard(A_in.device());
  at::Tensor A = A_in.contiguous(), b = b_in.contiguous();
  at::Tensor x = at::empty_like(b, at::MemoryFormat::Contiguous);
  const int64_t nA = A.numel() / (T * T), m = b.size(-2);
  if (nA == 0 || m == 0) return x;
  check(mtlfast_cuda_nnqp(A.data_ptr<double>(), b.data_ptr<double>(), nA, m, T, simplex ? 1 : 0,
                          steps, tol, x.data_ptr<double>(), current_stream(A)),
        "nnqp");
  return x;
}

at::Tensor cagrad_cuda(const at::Tensor& A_in, const at::Tensor& p_in, double c,
                       int64_t root_steps, int64_t qp_steps, double tol) {
  check_solver_input(A_in, "cagrad", "A", 2);
  check_solver_input(p_in, "cagrad", "p", 1);
  const int64_t T = solver_T(A_in, "cagrad");
  TORCH_CHECK(p_in.sizes() == A_in.sizes().slice(0, A_in.dim() - 1),
              "cagrad: p must have shape (..., T) matching A ", A_in.sizes(), ", got ",
              p_in.sizes());
  TORCH_CHECK(p_in.device() == A_in.device(), "cagrad: A and p on different devices");
  c10::OptionalDeviceGuard guard(A_in.device());
  at::Tensor A = A_in.contiguous(), p = p_in.contiguous();
  at::Tensor w = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t batch = p.numel() / T;
  if (batch == 0) return w;
  check(mtlfast_cuda_cagrad(A.data_ptr<double>(), p.data_ptr<double>(), batch, T, c, root_steps,
                            qp_steps, tol, w.data_ptr<double>(), current_stream(A)),
        "cagrad");
  return w;
}

// Float Grams of any dtype are computed in float64 and returned in their dtype (as the CPU op).
at::Tensor power_fixed_point_cuda(const at::Tensor& K_in, double alpha, int64_t iters) {
  TORCH_CHECK(K_in.is_cuda() && K_in.is_floating_point() && K_in.dim() >= 2,
              "power_fixed_point: K must be a floating CUDA tensor (..., T, T), got ",
              K_in.scalar_type(), " ", K_in.sizes(), " on ", K_in.device());
  TORCH_CHECK(alpha > 0, "power_fixed_point: alpha must be > 0, got ", alpha);
  const int64_t T = solver_T(K_in, "power_fixed_point");
  c10::OptionalDeviceGuard guard(K_in.device());
  at::Tensor K = K_in.to(at::kDouble).contiguous();
  at::Tensor w = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  const int64_t batch = w.numel() / T;
  if (batch == 0) return w.to(K_in.scalar_type());
  check(mtlfast_cuda_power_fixed_point(K.data_ptr<double>(), batch, T, alpha, iters,
                                       w.data_ptr<double>(), current_stream(K)),
        "power_fixed_point");
  return w.to(K_in.scalar_type());
}

at::Tensor imtl_weights_cuda(const at::Tensor& K_in, double sum_tol) {
  check_solver_input(K_in, "imtl_weights", "K", 2);
  const int64_t T = solver_T(K_in, "imtl_weights");
  c10::OptionalDeviceGuard guard(K_in.device());
  at::Tensor K = K_in.contiguous();
  at::Tensor w = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  const int64_t batch = w.numel() / T;
  if (batch == 0) return w;
  check(mtlfast_cuda_imtl_weights(K.data_ptr<double>(), batch, T, sum_tol, w.data_ptr<double>(),
                                  current_stream(K)),
        "imtl_weights");
  return w;
}

std::tuple<at::Tensor, at::Tensor> sym_eig_cuda(const at::Tensor& K_in) {
  check_solver_input(K_in, "sym_eig", "K", 2);
  const int64_t T = solver_T(K_in, "sym_eig");
  c10::OptionalDeviceGuard guard(K_in.device());
  at::Tensor K = K_in.contiguous();
  at::Tensor lam = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  at::Tensor V = at::empty_like(K, at::MemoryFormat::Contiguous);
  const int64_t batch = lam.numel() / T;
  if (batch == 0) return {lam, V};
  check(mtlfast_cuda_sym_eig(K.data_ptr<double>(), batch, T, lam.data_ptr<double>(),
                             V.data_ptr<double>(), current_stream(K)),
        "sym_eig");
  return {lam, V};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def(
      "combine_(Tensor w, Tensor G, Tensor(a!) out, bool accumulate, float scale, "
      "Tensor? scale_tensor=None) -> ()");
  m.def("graddrop(Tensor G, Tensor u, Tensor? leak=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtlfast, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("combine_", &combine_cuda);
  m.impl("graddrop", &graddrop_cuda);
  m.impl("pcgrad", &pcgrad_cuda);  // schema in csrc/cpu/solvers.cpp
  m.impl("pcgrad_orders", &pcgrad_orders_cuda);
  m.impl("nnqp", &nnqp_cuda);
  m.impl("cagrad", &cagrad_cuda);
  m.impl("power_fixed_point", &power_fixed_point_cuda);  // schema in csrc/cpu/solvers_nonlinear.cpp
  m.impl("imtl_weights", &imtl_weights_cuda);
  m.impl("sym_eig", &sym_eig_cuda);
}

}  // namespace mtlfast
