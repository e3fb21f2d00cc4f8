// CPU versions of mtlfast/ops/solvers.py (the torch reference is the spec; the algorithm and
// its step budget are the same, step by step). Every problem of a batch runs the active-set
// method on its own small dense system and stops as soon as it has converged, which is what
// makes a T = 32 solve cost microseconds instead of a fixed budget of batched torch calls.
// The solvers themselves live in csrc/common/solver_core.h, shared with the CUDA kernels
// (csrc/cuda/solvers.cu): here they run on a one-thread team.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/philox.h"
#include "../common/solver_core.h"

namespace mtlfast {
namespace {

// One problem of nnqp_reference (the shared core, csrc/common/solver_core.h, on one thread).
void nnqp_one(const double* A, const double* b, int T, bool simplex, int64_t steps, double tol,
              double* x, std::vector<double>& ws, std::vector<int>& iws) {
  core::SerialTeam team;
  core::nnqp_solve(team, A, b, T, simplex, steps, tol, x, ws.data(), iws.data());
}

  at::Tensor nnqp_cpu(const at::Tensor& A_in, const at::Tensor& b_in, bool simplex, int64_t steps,
                      double tol) {
    TORCH_CHECK(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2),
                "nnqp: A must have shape (..., T, T), got ", A_in.sizes());
    TORCH_CHECK(b_in.dim() == A_in.dim() && b_in.size(-1) == A_in.size(-1),
                "nnqp: b must have shape (..., m, T) matching A, got ", b_in.sizes());
    TORCH_CHECK(A_in.scalar_type() == at::kDouble && b_in.scalar_type() == at::kDouble,
                "nnqp: A and b must be float64");
    const at::Tensor A = A_in.contiguous();
    const at::Tensor b = b_in.contiguous();
    const int T = static_cast<int>(A.size(-1));
    const int64_t m = b.size(-2);
    const int64_t nA = A.numel() / (static_cast<int64_t>(T) * T);
    TORCH_CHECK(b.numel() == nA * m * T, "nnqp: batch shapes of A and b differ");
    at::Tensor x = at::empty_like(b);
    const double* pA = A.data_ptr<double>();
    const double* pb = b.data_ptr<double>();
    double* px = x.data_ptr<double>();
    at::parallel_for(0, nA * m, 16, [&](int64_t begin, int64_t end) {
      std::vector<double> ws(core::nnqp_ws_doubles(T));
      std::vector<int> iws(core::nnqp_ws_ints(T));
      for (int64_t p = begin; p < end; ++p)
        nnqp_one(pA + (p / m) * T * T, pb + p * T, T, simplex, steps, tol, px + p * T, ws, iws);
    });
    return x;
  }

  at::Tensor cagrad_cpu(const at::Tensor& A_in, const at::Tensor& p_in, double c,
                        int64_t root_steps, int64_t qp_steps, double tol) {
    TORCH_CHECK(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2),
                "cagrad: A must have shape (..., T, T), got ", A_in.sizes());
    TORCH_CHECK(p_in.dim() == A_in.dim() - 1 && p_in.size(-1) == A_in.size(-1),
                "cagrad: p must have shape (..., T) matching A, got ", p_in.sizes());
    TORCH_CHECK(A_in.scalar_type() == at::kDouble && p_in.scalar_type() == at::kDouble,
                "cagrad: A and p must be float64");
    const at::Tensor A = A_in.contiguous();
    const at::Tensor p = p_in.contiguous();
    const int T = static_cast<int>(A.size(-1));
    const int64_t nB = p.numel() / T;
    at::Tensor w = at::empty_like(p);
    const double* pA = A.data_ptr<double>();
    const double* pp = p.data_ptr<double>();
    double* pw = w.data_ptr<double>();
    at::parallel_for(0, nB, 4, [&](int64_t begin, int64_t end) {
      std::vector<double> ws(core::cagrad_ws_doubles(T));
      std::vector<int> iws(core::cagrad_ws_ints(T));
      core::SerialTeam team;
      for (int64_t q = begin; q < end; ++q)
        core::cagrad_solve(team, pA + q * T * T, pp + q * T, T, c, root_steps, qp_steps, tol,
                           pw + q * T, ws.data(), iws.data());
    });
    return w;
  }

  // PCGrad's recursion on the Gram for every task i: row i of the result holds the
  // coefficients of g_i^PC in terms of the rows of G. Same steps as pcgrad_weights_reference.
  at::Tensor pcgrad_cpu(const at::Tensor& K_in, const at::Tensor& orders_in) {
    TORCH_CHECK(K_in.dim() >= 2 && K_in.size(-1) == K_in.size(-2),
                "pcgrad: K must have shape (..., T, T), got ", K_in.sizes());
    TORCH_CHECK(K_in.scalar_type() == at::kDouble, "pcgrad: K must be float64");
    TORCH_CHECK(orders_in.sizes() == K_in.sizes() && orders_in.scalar_type() == at::kLong,
                "pcgrad: orders must be int64 with K's shape");
    const at::Tensor K = K_in.contiguous();
    const at::Tensor orders = orders_in.contiguous();
    const int64_t T = K.size(-1);
    const int64_t nB = K.numel() / (T * T);
    at::Tensor C = at::zeros_like(K);
    const double* pK = K.data_ptr<double>();
    const int64_t* po = orders.data_ptr<int64_t>();
    double* pC = C.data_ptr<double>();
    for (int64_t i = 0; i < orders.numel(); ++i)
      TORCH_CHECK(po[i] >= 0 && po[i] < T, "pcgrad: orders entries must lie in [0, T)");
    at::parallel_for(0, nB * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t bi = p / T, i = p % T;
        const double* Kb = pK + bi * T * T;
        const int64_t* order = po + p * T;
        double* c = pC + p * T;
        c[i] = 1.0;
        for (int64_t s = 0; s < T; ++s) {
          const int64_t j = order[s];
          if (j == i) continue;
          double ip = 0.0;
          for (int64_t l = 0; l < T; ++l) ip += Kb[j * T + l] * c[l];
          const double kjj = Kb[j * T + j];
          if (ip < 0.0 && kjj > 0.0) c[j] -= ip / kjj;
        }
      }
    });
    return C;
  }

  // PCGrad's random task orders (batch, T, T) from the state [seed, step] (csrc/common/philox.h),
  // then step += 1 in place: the same draws as the CUDA kernel.
  at::Tensor pcgrad_orders_cpu(at::Tensor& state, int64_t batch, int64_t T) {
    TORCH_CHECK(state.dim() == 1 && state.numel() == 2 && state.scalar_type() == at::kLong &&
                    state.is_contiguous(),
                "pcgrad_orders: state must be a contiguous int64 tensor [seed, step]");
    TORCH_CHECK(batch >= 1 && batch <= 0xFFFFFFFFll && T >= 1 && T <= 0xFFFFFFFFll,
                "pcgrad_orders: batch and T must be in [1, 2^32), got ", batch, " and ", T);
    int64_t* ps = state.data_ptr<int64_t>();
    const uint64_t seed = static_cast<uint64_t>(ps[0]), step = static_cast<uint64_t>(ps[1]);
    at::Tensor orders = at::empty({batch, T, T}, state.options());
    int64_t* po = orders.data_ptr<int64_t>();
    at::parallel_for(0, batch * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        core::random_order(seed, step, static_cast<uint32_t>(r / T), static_cast<uint32_t>(r % T),
                           static_cast<int>(T), po + r * T);
    });
    ps[1] = static_cast<int64_t>(step + 1);
    return orders;
  }

  }  // namespace

  TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
    m.def("nnqp(Tensor A, Tensor b, bool simplex, int steps, float tol) -> Tensor");
    m.def("pcgrad(Tensor K, Tensor orders) -> Tensor");
    m.def("pcgrad_orders(Tensor(a!) state, int batch, int T) -> Tensor");
    m.def("cagrad(Tensor A, Tensor p, float c, int root_steps, int qp_steps, float tol) -> Tensor");
  }
  TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
    m.impl("nnqp", &nnqp_cpu);
    m.impl("pcgrad", &pcgrad_cpu);
    m.impl("pcgrad_orders", &pcgrad_orders_cpu);
    m.impl("cagrad", &cagrad_cpu);
  }

  }  // namespace mtlfast
