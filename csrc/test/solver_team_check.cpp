// Test ops: the shared solver core (csrc/common/solver_core.h) run by a team of several CPU
// threads, so the code the GPU runs with a whole thread block (strided loops, owned entries,
// barriers, reductions that every rank must agree on) is exercised without a GPU. The team
// mirrors BlockTeam in csrc/cuda/solvers.cu: ranks, a barrier, reductions whose result every
// rank receives. tests/ops/test_solver_core.py builds this file into its own small extension
// (torch.utils.cpp_extension.load) and compares the ops with the torch references; it is not
// part of mtlfast._C. One thread is the serial core, the code path of the CPU kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <barrier>
#include <functional>
#include <thread>
#include <tuple>
#include <vector>

#include "../common/solver_core.h"

namespace mtlfast {
namespace {

struct Shared {
  explicit Shared(int n) : barrier(n), v(n), i(n) {}
  std::barrier<> barrier;
  std::vector<double> v;
  std::vector<int> i;
};

class ThreadTeam {
 public:
  ThreadTeam(Shared* shared, int rank, int size) : s_(shared), rank_(rank), size_(size) {}
  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() const { s_->barrier.arrive_and_wait(); }
  double sum(double v) const {
    return reduce(v, [](double a, double b) { return a + b; });
  }
  double max(double v) const {
    return reduce(v, [](double a, double b) { return core::max_(a, b); });
  }
  core::Arg argmax(core::Arg a) const { return arg(a, true); }
  core::Arg argmin(core::Arg a) const { return arg(a, false); }

 private:
  double reduce(double v, const std::function<double(double, double)>& op) const {
    s_->v[rank_] = v;
    sync();
    double t = s_->v[0];
    for (int r = 1; r < size_; ++r) t = op(t, s_->v[r]);
    sync();
    return t;
  }
  core::Arg arg(core::Arg a, bool is_max) const {
    s_->v[rank_] = a.v;
    s_->i[rank_] = a.i;
    sync();
    core::Arg t{s_->v[0], s_->i[0]};
    for (int r = 1; r < size_; ++r) {
      const bool better = is_max ? core::beats_max(s_->v[r], s_->i[r], t)
                                 : core::beats_min(s_->v[r], s_->i[r], t);
      if (better) t = core::Arg{s_->v[r], s_->i[r]};
    }
    sync();
    return t;
  }
  Shared* s_;
  int rank_, size_;
};

// Runs body(team) on `threads` threads, one problem at a time.
void run_team(int threads, const std::function<void(ThreadTeam&)>& body) {
  Shared shared(threads);
  std::vector<std::thread> pool;
  for (int r = 1; r < threads; ++r)
    pool.emplace_back([&, r] {
      ThreadTeam team(&shared, r, threads);
      body(team);
    });
  ThreadTeam team(&shared, 0, threads);
  body(team);
  for (auto& t : pool) t.join();
}

void check_threads(int64_t threads) {
  TORCH_CHECK(threads >= 1 && threads <= 64, "team check: threads must be in [1, 64]");
}

at::Tensor team_nnqp(const at::Tensor& A_in, const at::Tensor& b_in, bool simplex,
                     int64_t steps, double tol, int64_t threads) {
  check_threads(threads);
  const at::Tensor A = A_in.to(at::kDouble).contiguous(), b = b_in.to(at::kDouble).contiguous();
  const int T = static_cast<int>(A.size(-1));
  const int64_t m = b.size(-2), problems = b.numel() / T;
  at::Tensor x = at::empty_like(b);
  std::vector<double> ws(core::nnqp_ws_doubles(T));
  std::vector<int> iws(core::nnqp_ws_ints(T));
  for (int64_t p = 0; p < problems; ++p)
    run_team(static_cast<int>(threads), [&](ThreadTeam& team) {
      core::nnqp_solve(team, A.data_ptr<double>() + (p / m) * T * T,
                       b.data_ptr<double>() + p * T, T, simplex, steps, tol,
                       x.data_ptr<double>() + p * T, ws.data(), iws.data());
    });
  return x;
}

at::Tensor team_cagrad(const at::Tensor& A_in, const at::Tensor& p_in, double c,
                       int64_t root_steps, int64_t qp_steps, double tol, int64_t threads) {
  check_threads(threads);
  const at::Tensor A = A_in.to(at::kDouble).contiguous(), p = p_in.to(at::kDouble).contiguous();
  const int T = static_cast<int>(A.size(-1));
  at::Tensor w = at::empty_like(p);
  std::vector<double> ws(core::cagrad_ws_doubles(T));
  std::vector<int> iws(core::cagrad_ws_ints(T));
  for (int64_t q = 0; q < p.numel() / T; ++q)
    run_team(static_cast<int>(threads), [&](ThreadTeam& team) {
      core::cagrad_solve(team, A.data_ptr<double>() + q * T * T, p.data_ptr<double>() + q * T, T,
                         c, root_steps, qp_steps, tol, w.data_ptr<double>() + q * T, ws.data(),
                         iws.data());
    });
  return w;
}

at::Tensor team_power_fixed_point(const at::Tensor& K_in, double alpha, int64_t iters,
                                  int64_t threads) {
  check_threads(threads);
  const at::Tensor K = K_in.to(at::kDouble).contiguous();
  const int n = static_cast<int>(K.size(-1));
  at::Tensor w = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  std::vector<double> ws(core::power_fixed_point_ws_doubles(n));
  for (int64_t q = 0; q < w.numel() / n; ++q)
    run_team(static_cast<int>(threads), [&](ThreadTeam& team) {
      core::power_fixed_point_solve(team, K.data_ptr<double>() + q * n * n, n, alpha, iters,
                                    w.data_ptr<double>() + q * n, ws.data());
    });
  return w;
}

at::Tensor team_imtl_weights(const at::Tensor& K_in, double sum_tol, int64_t threads) {
  check_threads(threads);
  const at::Tensor K = K_in.to(at::kDouble).contiguous();
  const int n = static_cast<int>(K.size(-1));
  at::Tensor w = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  std::vector<double> ws(core::imtl_ws_doubles(n));
  for (int64_t q = 0; q < w.numel() / n; ++q)
    run_team(static_cast<int>(threads), [&](ThreadTeam& team) {
      core::imtl_solve(team, K.data_ptr<double>() + q * n * n, n, sum_tol,
                       w.data_ptr<double>() + q * n, ws.data());
    });
  return w;
}

std::tuple<at::Tensor, at::Tensor> team_sym_eig(const at::Tensor& K_in, int64_t threads) {
  check_threads(threads);
  const at::Tensor K = K_in.to(at::kDouble).contiguous();
  const int n = static_cast<int>(K.size(-1));
  at::Tensor lam = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  at::Tensor V = at::empty_like(K);
  std::vector<double> ws(core::sym_eig_ws_doubles(n));
  for (int64_t q = 0; q < lam.numel() / n; ++q)
    run_team(static_cast<int>(threads), [&](ThreadTeam& team) {
      core::sym_eig_solve(team, K.data_ptr<double>() + q * n * n, n,
                          lam.data_ptr<double>() + q * n, V.data_ptr<double>() + q * n * n,
                          ws.data());
    });
  return {lam, V};
}

}  // namespace

TORCH_LIBRARY(mtlfast_test, m) {
  m.def("team_nnqp(Tensor A, Tensor b, bool simplex, int steps, float tol, int threads) -> Tensor");
  m.def("team_cagrad(Tensor A, Tensor p, float c, int root_steps, int qp_steps, float tol, "
        "int threads) -> Tensor");
  m.def("team_power_fixed_point(Tensor K, float alpha, int iters, int threads) -> Tensor");
  m.def("team_imtl_weights(Tensor K, float sum_tol, int threads) -> Tensor");
  m.def("team_sym_eig(Tensor K, int threads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtlfast_test, CPU, m) {
  m.impl("team_nnqp", &team_nnqp);
  m.impl("team_cagrad", &team_cagrad);
  m.impl("team_power_fixed_point", &team_power_fixed_point);
  m.impl("team_imtl_weights", &team_imtl_weights);
  m.impl("team_sym_eig", &team_sym_eig);
}

}  // namespace mtlfast
