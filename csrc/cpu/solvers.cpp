// CPU versions of mtlfast/ops/solvers.py (the torch reference is the spec; the algorithm and
// its step budget are the same, step by step). Every problem of a batch runs the active-set
// method on its own small dense system and stops as soon as it has converged, which is what
// makes a T = 32 solve cost microseconds instead of a fixed budget of batched torch calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace mtlfast {
namespace {

// Solves M y = r in place (M n x n row-major, r length n) by Gaussian elimination with partial
// pivoting. Returns false for a zero pivot or a non-finite result.
bool lu_solve(std::vector<double>& M, std::vector<double>& r, int n) {
  for (int c = 0; c < n; ++c) {
    int p = c;
    double best = std::abs(M[c * n + c]);
    for (int i = c + 1; i < n; ++i) {
      const double v = std::abs(M[i * n + c]);
      if (v > best) best = v, p = i;
    }
    if (!(best > 0.0)) return false;
    if (p != c) {
      for (int k = 0; k < n; ++k) std::swap(M[c * n + k], M[p * n + k]);
      std::swap(r[c], r[p]);
    }
    const double inv = 1.0 / M[c * n + c];
    for (int i = c + 1; i < n; ++i) {
      const double f = M[i * n + c] * inv;
      if (f == 0.0) continue;
      for (int k = c + 1; k < n; ++k) M[i * n + k] -= f * M[c * n + k];
      r[i] -= f * r[c];
    }
  }
  for (int c = n - 1; c >= 0; --c) {
    double s = r[c];
    for (int k = c + 1; k < n; ++k) s -= M[c * n + k] * r[k];
    r[c] = s / M[c * n + c];
    if (!std::isfinite(r[c])) return false;
  }
  return true;
}

// Cholesky factor L (row-major, leading dimension T) of A restricted to ord, in ord's order.
// Returns false when the restricted matrix is not numerically positive definite.
bool chol_rebuild(const double* A, int T, const std::vector<int>& ord, std::vector<double>& L) {
  const int k = static_cast<int>(ord.size());
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j <= i; ++j) {
      double s = A[ord[i] * T + ord[j]];
      for (int m = 0; m < j; ++m) s -= L[i * T + m] * L[j * T + m];
      if (i == j) {
        if (!(s > 0.0)) return false;
        L[i * T + i] = std::sqrt(s);
      } else {
        L[i * T + j] = s / L[j * T + j];
      }
    }
  }
  return true;
}

// Appends index j to the factor (one forward substitution); false when not positive definite.
bool chol_append(const double* A, int T, std::vector<int>& ord, std::vector<double>& L, int j) {
  const int k = static_cast<int>(ord.size());
  double d = A[j * T + j];
  for (int c = 0; c < k; ++c) {
    double s = A[ord[c] * T + j];
    for (int m = 0; m < c; ++m) s -= L[c * T + m] * L[k * T + m];
    L[k * T + c] = s / L[c * T + c];
    d -= L[k * T + c] * L[k * T + c];
  }
  if (!(d > 0.0)) return false;
  L[k * T + k] = std::sqrt(d);
  ord.push_back(j);
  return true;
}

// One problem: min 1/2 x^T A x + b^T x, x >= 0 (and sum x = 1 when simplex). See
// nnqp_reference in mtlfast/ops/solvers.py for the steps 0-4 this follows.
void nnqp_one(const double* A, const double* b, int T, bool simplex, int64_t steps, double tol,
              double* x) {
  std::vector<char> S(T, 0);
  std::vector<double> z(T), grad(T), M, r;
  std::vector<int> idx, ord;
  idx.reserve(T);
  ord.reserve(T);
  // Non-negative case: the support system A_SS is positive definite (Lawson-Hanson adds only
  // indices with a positive multiplier), so it is kept as a Cholesky factor grown by one row
  // per added index and rebuilt after a drop; LU on the assembled system is the fallback.
  std::vector<double> L(simplex ? 0 : static_cast<size_t>(T) * T);
  bool chol = !simplex;
  for (int i = 0; i < T; ++i) x[i] = 0.0;
  if (simplex) {
    int j0 = 0;
    double best = std::numeric_limits<double>::infinity();
    for (int j = 0; j < T; ++j) {
      const double v = 0.5 * A[j * T + j] + b[j];
      if (v < best) best = v, j0 = j;
    }
    S[j0] = 1;
    x[j0] = 1.0;
  }
  for (int64_t step = 0; step < steps; ++step) {
    // Step 1: the equality-constrained solve on the support.
    if (chol) {
      const int k = static_cast<int>(ord.size());
      idx = ord;
      r.assign(k, 0.0);
      for (int a = 0; a < k; ++a) {
        double s = -b[ord[a]];
        for (int m = 0; m < a; ++m) s -= L[a * T + m] * r[m];
        r[a] = s / L[a * T + a];
      }
      for (int a = k - 1; a >= 0; --a) {
        double s = r[a];
        for (int m = a + 1; m < k; ++m) s -= L[m * T + a] * r[m];
        r[a] = s / L[a * T + a];
        if (!std::isfinite(r[a])) return;  // step 4: freeze
      }
    } else {
      idx.clear();
      for (int i = 0; i < T; ++i)
        if (S[i]) idx.push_back(i);
      const int k = static_cast<int>(idx.size());
      const int n = simplex ? k + 1 : k;
      M.assign(static_cast<size_t>(n) * n, 0.0);
      r.assign(n, 0.0);
      for (int a = 0; a < k; ++a) {
        for (int c = 0; c < k; ++c) M[a * n + c] = A[idx[a] * T + idx[c]];
        r[a] = -b[idx[a]];
      }
      if (simplex) {
        for (int a = 0; a < k; ++a) M[a * n + k] = M[k * n + a] = 1.0;
        r[k] = 1.0;
      }
      if (n > 0 && !lu_solve(M, r, n)) return;  // step 4: freeze
    }
    const int k = static_cast<int>(idx.size());
    std::fill(z.begin(), z.end(), 0.0);
    bool feasible = true;
    for (int a = 0; a < k; ++a) {
      z[idx[a]] = r[a];
      feasible = feasible && r[a] > 0.0;
    }
    if (feasible) {
      // Step 2: accept z; add the most violated multiplier or stop.
      for (int i = 0; i < T; ++i) x[i] = z[i];
      double lam = 0.0;
      for (int i = 0; i < T; ++i) {
        double g = b[i];
        for (int a = 0; a < k; ++a) g += A[i * T + idx[a]] * z[idx[a]];
        grad[i] = g;
        lam += z[i] * g;
      }
      if (!simplex) lam = 0.0;
      int j = -1;
      double mu_max = -std::numeric_limits<double>::infinity();
      for (int i = 0; i < T; ++i) {
        if (S[i]) continue;
        const double mu = lam - grad[i];
        if (mu > mu_max) mu_max = mu, j = i;
      }
      if (!(mu_max > tol)) return;
      S[j] = 1;
      if (chol) chol = chol_append(A, T, ord, L, j);
    } else {
        // Step 3: move towards z until the first support index reaches zero; drop it.
        double alpha = std::numeric_limits<double>::infinity();
        int kb = -1;
        for (int a = 0; a < k; ++a) {
          const int i = idx[a];
          if (z[i] > 0.0) continue;
          const double ratio = x[i] / std::max(x[i] - z[i], std::numeric_limits<double>::min());
          if (ratio < alpha) alpha = ratio, kb = i;
        }
        alpha = std::min(std::max(alpha, 0.0), 1.0);
        for (int a = 0; a < k; ++a) {
          const int i = idx[a];
          x[i] = std::max(x[i] + alpha * (z[i] - x[i]), 0.0);
        }
        x[kb] = 0.0;
        for (int a = 0; a < k; ++a) S[idx[a]] = x[idx[a]] > 0.0;
        if (!simplex) {
          ord.clear();
          for (int i = 0; i < T; ++i)
            if (S[i]) ord.push_back(i);
          chol = chol_rebuild(A, T, ord, L);
        }
      }
    }
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
      for (int64_t p = begin; p < end; ++p)
        nnqp_one(pA + (p / m) * T * T, pb + p * T, T, simplex, steps, tol, px + p * T);
    });
    return x;
  }

  double quad(const double* A, const double* u, const double* v, int T) {
    double s = 0.0;
    for (int i = 0; i < T; ++i) {
      double t = 0.0;
      for (int j = 0; j < T; ++j) t += A[i * T + j] * v[j];
      s += u[i] * t;
    }
    return s;
  }

  // CAGrad's inner problem; the steps of cagrad_weights in mtlfast/ops/solvers.py. Stops early
  // once beta is a fixed point (the remaining steps would repeat it exactly).
  void cagrad_one(const double* A, const double* p, int T, double c, int64_t root_steps,
                  int64_t qp_steps, double tol, double* w) {
    std::vector<double> a(T, 0.0), b(T), w0(T), w1(T), M, M2, r0, r1;
    std::vector<int> idx;
    double max_diag = 0.0;
    for (int i = 0; i < T; ++i) {
      for (int j = 0; j < T; ++j) a[i] += A[i * T + j] * p[j];
      max_diag = std::max(max_diag, A[i * T + i]);
    }
    const double r = c * std::sqrt(std::max(quad(A, p, p, T), 0.0));
    double lo = 0.0, hi = r > 0.0 ? std::sqrt(max_diag) / r : 1.0, beta = hi / 2;
    for (int64_t it = 0; it < root_steps; ++it) {
      for (int i = 0; i < T; ++i) b[i] = beta * a[i];
      nnqp_one(A, b.data(), T, true, qp_steps, tol, w);
      const double phi = std::sqrt(std::max(quad(A, w, w, T), 0.0)) - r * beta;
      if (phi >= 0.0) lo = beta;
      if (phi <= 0.0) hi = beta;
      idx.clear();
      for (int i = 0; i < T; ++i)
        if (w[i] > 0.0) idx.push_back(i);
      const int k = static_cast<int>(idx.size()), n = k + 1;
      M.assign(static_cast<size_t>(n) * n, 0.0);
      for (int x = 0; x < k; ++x) {
        for (int y = 0; y < k; ++y) M[x * n + y] = A[idx[x] * T + idx[y]];
        M[x * n + k] = M[k * n + x] = 1.0;
      }
      M2 = M;
      r0.assign(n, 0.0);
      r1.assign(n, 0.0);
      r0[k] = 1.0;
      for (int x = 0; x < k; ++x) r1[x] = -a[idx[x]];
      double next = (lo + hi) / 2;
      if (lu_solve(M, r0, n) && lu_solve(M2, r1, n)) {
        std::fill(w0.begin(), w0.end(), 0.0);
        std::fill(w1.begin(), w1.end(), 0.0);
        for (int x = 0; x < k; ++x) w0[idx[x]] = r0[x], w1[idx[x]] = r1[x];
        const double qa = quad(A, w1.data(), w1.data(), T) - r * r;
        const double qb = quad(A, w0.data(), w1.data(), T);
        const double qc = quad(A, w0.data(), w0.data(), T);
        const double disc = qb * qb - qa * qc;
        const double root = qc / (-qb + std::sqrt(std::max(disc, 0.0)));
        if (std::isfinite(root) && disc >= 0.0 && root >= lo && root <= hi) next = root;
      }
      if (next == beta) return;  // a fixed point: w is already the QP solution at beta
      beta = next;
    }
    for (int i = 0; i < T; ++i) b[i] = beta * a[i];
    nnqp_one(A, b.data(), T, true, qp_steps, tol, w);
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
      for (int64_t q = begin; q < end; ++q)
        cagrad_one(pA + q * T * T, pp + q * T, T, c, root_steps, qp_steps, tol, pw + q * T);
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

  }  // namespace

  TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
    m.def("nnqp(Tensor A, Tensor b, bool simplex, int steps, float tol) -> Tensor");
    m.def("pcgrad(Tensor K, Tensor orders) -> Tensor");
    m.def("cagrad(Tensor A, Tensor p, float c, int root_steps, int qp_steps, float tol) -> Tensor");
  }
  TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
    m.impl("nnqp", &nnqp_cpu);
    m.impl("pcgrad", &pcgrad_cpu);
    m.impl("cagrad", &cagrad_cpu);
  }

  }  // namespace mtlfast
