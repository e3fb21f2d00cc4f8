// T x T solves of the non-QP Gram methods, in float64 on the CPU, batched over leading dims.
// Each op mirrors its torch reference in mtlfast/ops/solvers_nonlinear.py step for step (same
// start, same line search, same masks), so results agree to rounding; the only liberty taken
// is stopping the Newton loop once a step no longer changes w, which the reference cannot do
// without reading the device.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/solver_core.h"

namespace mtlfast {
namespace {

constexpr double kEps64 = std::numeric_limits<double>::epsilon();

// ---------------------------------------------------------------------------------------------
// Symmetric eigendecomposition (Householder tridiagonalization + implicit QL, after the public
// domain JAMA/EISPACK tred2/tql2). A (n x n, row-major) is overwritten by the eigenvectors
// (columns), d receives the eigenvalues in ascending order. The CPU build's one eigensolver:
// measured 2.6x (T=8) to 40x (T=64) faster than the shared core's Jacobi method on one thread
// (benchmarks/RESULTS.md); the Jacobi method serves the CUDA kernels, where a block of threads
// runs its rotations in parallel.
void sym_eig(double* V, double* d, int64_t n) {
  std::vector<double> e_buf(static_cast<size_t>(n));
  double* e = e_buf.data();
  auto at = [&](int64_t r, int64_t c) -> double& { return V[r * n + c]; };
  for (int64_t j = 0; j < n; ++j) d[j] = at(n - 1, j);
  for (int64_t i = n - 1; i > 0; --i) {
    double scale = 0.0, h = 0.0;
    for (int64_t k = 0; k < i; ++k) scale += std::abs(d[k]);
    if (scale == 0.0) {
      e[i] = d[i - 1];
      for (int64_t j = 0; j < i; ++j) {
        d[j] = at(i - 1, j);
        at(i, j) = 0.0;
        at(j, i) = 0.0;
      }
    } else {
      for (int64_t k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int64_t j = 0; j < i; ++j) e[j] = 0.0;
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        at(j, i) = f;
        g = e[j] + at(j, j) * f;
        for (int64_t k = j + 1; k <= i - 1; ++k) {
          g += at(k, j) * d[k];
          e[k] += at(k, j) * f;
        }
        e[j] = g;
      }
      f = 0.0;
      for (int64_t j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int64_t j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int64_t k = j; k <= i - 1; ++k) at(k, j) -= (f * e[k] + g * d[k]);
        d[j] = at(i - 1, j);
        at(i, j) = 0.0;
      }
    }
    d[i] = h;
  }
  for (int64_t i = 0; i < n - 1; ++i) {
    at(n - 1, i) = at(i, i);
    at(i, i) = 1.0;
    const double h = d[i + 1];
    if (h != 0.0) {
      for (int64_t k = 0; k <= i; ++k) d[k] = at(k, i + 1) / h;
      for (int64_t j = 0; j <= i; ++j) {
        double g = 0.0;
        for (int64_t k = 0; k <= i; ++k) g += at(k, i + 1) * at(k, j);
        for (int64_t k = 0; k <= i; ++k) at(k, j) -= g * d[k];
      }
    }
    for (int64_t k = 0; k <= i; ++k) at(k, i + 1) = 0.0;
  }
  for (int64_t j = 0; j < n; ++j) {
    d[j] = at(n - 1, j);
    at(n - 1, j) = 0.0;
  }
  at(n - 1, n - 1) = 1.0;
  e[0] = 0.0;

  for (int64_t i = 1; i < n; ++i) e[i - 1] = e[i];
  e[n - 1] = 0.0;
  double f = 0.0, tst1 = 0.0;
  for (int64_t l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::abs(d[l]) + std::abs(e[l]));
    int64_t m = l;
    while (m < n - 1 && !(std::abs(e[m]) <= kEps64 * tst1)) ++m;
    if (m > l) {
      for (int iter = 0; iter < 64; ++iter) {  // converges in 2-3; the cap guards NaN input
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = std::hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int64_t i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = 1.0, c3 = 1.0, s = 0.0, s2 = 0.0;
        const double el1 = e[l + 1];
        for (int64_t i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = std::hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          for (int64_t k = 0; k < n; ++k) {
            h = at(k, i + 1);
            at(k, i + 1) = s * at(k, i) + c * h;
            at(k, i) = c * at(k, i) - s * h;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
        if (!(std::abs(e[l]) > kEps64 * tst1)) break;
      }
    }
    d[l] += f;
    e[l] = 0.0;
  }
  for (int64_t i = 0; i < n - 1; ++i) {  // ascending, vectors alongside
    int64_t k = i;
    double p = d[i];
    for (int64_t j = i + 1; j < n; ++j)
      if (d[j] < p) {
        k = j;
        p = d[j];
      }
    if (k != i) {
      d[k] = d[i];
      d[i] = p;
      for (int64_t j = 0; j < n; ++j) std::swap(at(j, i), at(j, k));
    }
  }
}

double dtype_eps(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? kEps64 : std::numeric_limits<float>::epsilon();
}

// Eigenvalues above rounding noise of a Gram: lam > lam_max * n * eps.
int64_t count_kept(const double* lam, int64_t n, double eps, std::vector<char>& keep) {
  const double tol = lam[n - 1] * static_cast<double>(n) * eps;
  int64_t rank = 0;
  for (int64_t i = 0; i < n; ++i) {
    keep[i] = lam[i] > tol;
    rank += keep[i];
  }
  return rank;
}

void aligned_mtl_one(const double* K, const double* pref, int64_t n, int64_t mode, double eps,
                     double* w) {
  std::vector<double> V(static_cast<size_t>(n * n)), lam(n), coef(n);
  std::vector<char> keep(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) V[i * n + j] = 0.5 * (K[i * n + j] + K[j * n + i]);
  sym_eig(V.data(), lam.data(), n);
  const int64_t rank = count_kept(lam.data(), n, eps, keep);
  if (rank == 0) {
    std::copy(pref, pref + n, w);
    return;
  }
  double scale;
  if (mode == 0) {
    scale = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i)
      if (keep[i]) scale = std::min(scale, lam[i]);
  } else if (mode == 1) {
    scale = lam[n - rank + (rank - 1) / 2];
  } else {
    scale = 0.0;
    for (int64_t i = 0; i < n; ++i)
      if (keep[i]) scale += lam[i];
    scale /= static_cast<double>(rank);
  }
  const double root = std::sqrt(scale);
  for (int64_t k = 0; k < n; ++k) {
    double t = 0.0;
    for (int64_t i = 0; i < n; ++i) t += V[i * n + k] * pref[i];
    const double inv_sqrt =
        keep[k] ? 1.0 / std::sqrt(std::max(lam[k], std::numeric_limits<double>::min())) : 0.0;
    coef[k] = t * inv_sqrt * root;
  }
  for (int64_t i = 0; i < n; ++i) {
    double t = 0.0;
    for (int64_t k = 0; k < n; ++k) t += V[i * n + k] * coef[k];
    w[i] = t;
  }
}

// ConFIG's noise factor (CONFIG_NOISE in mtlfast/ops/solvers_nonlinear.py).
constexpr double kConfigNoise = 16.0;

void config_one(const double* K0, const double* pref, int64_t n, double eps, double* w) {
  std::vector<double> K(static_cast<size_t>(n * n)), V(static_cast<size_t>(n * n));
  std::vector<double> lam(n), inv_n(n), coef(n), c(n);
  std::vector<char> keep(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) K[i * n + j] = 0.5 * (K0[i * n + j] + K0[j * n + i]);
  for (int64_t i = 0; i < n; ++i) {
    const double norm = std::sqrt(std::max(K[i * n + i], 0.0));
    inv_n[i] = norm > 0 ? 1.0 / norm : 0.0;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) V[i * n + j] = K[i * n + j] * inv_n[i] * inv_n[j];
  sym_eig(V.data(), lam.data(), n);
  count_kept(lam.data(), n, eps, keep);
  double represented = 0.0, pref_sq = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    double t = 0.0;
    for (int64_t i = 0; i < n; ++i) t += V[i * n + k] * pref[i];
    coef[k] = keep[k] ? t / lam[k] : 0.0;
    if (keep[k]) represented += t * t;
    pref_sq += pref[k] * pref[k];
  }
  // u_i . d = (C C^+ pref)_i: when the part of pref that C represents is rounding noise
  // (|C C^+ pref| <= CONFIG_NOISE n eps |pref|, solvers_nonlinear.py), d is noise: no update.
  const double noise = kConfigNoise * static_cast<double>(n) * eps;
  if (!(represented > noise * noise * pref_sq)) {
    std::fill(w, w + n, 0.0);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    double t = 0.0;
    for (int64_t k = 0; k < n; ++k) t += V[i * n + k] * coef[k];
    c[i] = inv_n[i] * t;
  }
  double cKc = 0.0, sum_Kc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double t = 0.0;
    for (int64_t j = 0; j < n; ++j) t += K[i * n + j] * c[j];
    cKc += c[i] * t;
    sum_Kc += t;
  }
  for (int64_t i = 0; i < n; ++i) w[i] = cKc > 0 ? c[i] * sum_Kc / cKc : 0.0;
}

void gradvac_one(const double* K0, double* phi, const int64_t* perms, int64_t n, double beta,
                 double eps, double* w) {
  std::vector<double> K(static_cast<size_t>(n * n)), cK(n), C(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) K[i * n + j] = 0.5 * (K0[i * n + j] + K0[j * n + i]);
  std::fill(w, w + n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(C.begin(), C.end(), 0.0);
    C[i] = 1.0;
    std::copy(&K[i * n], &K[i * n] + n, cK.begin());
    for (int64_t s = 0; s < n - 1; ++s) {
      const int64_t p = perms[i * (n - 1) + s];
      const int64_t j = p + (p >= i);  // p-th task other than i
      double sq = 0.0;
      for (int64_t k = 0; k < n; ++k) sq += cK[k] * C[k];
      const double norm_i = std::sqrt(std::max(sq, 0.0));
      const double norm_j = std::sqrt(std::max(K[j * n + j], 0.0));
      const double cos = cK[j] / (norm_i * norm_j + eps);
      const double target = phi[i * n + j];
      if (cos < target) {
        const double sin_cos = std::sqrt(std::max(1 - cos * cos, 0.0));
        const double sin_target = std::sqrt(std::max(1 - target * target, 0.0));
        const double coef =
            norm_i * (target * sin_cos - cos * sin_target) / (norm_j * sin_target + eps);
        C[j] += coef;
        for (int64_t k = 0; k < n; ++k) cK[k] += coef * K[j * n + k];
      }
      phi[i * n + j] = (1 - beta) * target + beta * cos;
    }
    for (int64_t k = 0; k < n; ++k) w[k] += C[k];
  }
}

// (..., T, T) -> contiguous float64 view of B blocks.
at::Tensor as_blocks(const at::Tensor& K, const char* op) {
  TORCH_CHECK(K.dim() >= 2 && K.size(-1) == K.size(-2) && K.size(-1) > 0, op,
              ": K must have shape (..., T, T) with T > 0, got ", K.sizes());
  TORCH_CHECK(K.is_floating_point(), op, ": K must be floating point, got ", K.scalar_type());
  return K.to(at::kDouble).contiguous();
}

// The preference vector as float64, or `fill` for every task when absent.
std::vector<double> pref_vector(const std::optional<at::Tensor>& pref, int64_t n, double fill,
                                const char* op) {
  if (!pref.has_value()) return std::vector<double>(static_cast<size_t>(n), fill);
  TORCH_CHECK(pref->dim() == 1 && pref->size(0) == n, op, ": pref must have shape (", n,
              "), got ", pref->sizes());
  const at::Tensor p = pref->to(at::kDouble).contiguous();
  return std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + n);
}

at::Tensor power_fixed_point_cpu(const at::Tensor& K_in, double alpha, int64_t iters) {
  TORCH_CHECK(alpha > 0, "power_fixed_point: alpha must be > 0, got ", alpha);
  const at::Tensor K = as_blocks(K_in, "power_fixed_point");
  const int64_t n = K.size(-1), B = K.numel() / (n * n);
  at::Tensor out = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  const double* k = K.data_ptr<double>();
  double* w = out.data_ptr<double>();
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    std::vector<double> ws(core::power_fixed_point_ws_doubles(static_cast<int>(n)));
    core::SerialTeam team;
    for (int64_t b = b0; b < b1; ++b)
      core::power_fixed_point_solve(team, k + b * n * n, static_cast<int>(n), alpha, iters,
                                    w + b * n, ws.data());
  });
  return out.to(K_in.scalar_type());
}

at::Tensor aligned_mtl_weights_cpu(const at::Tensor& K_in,
                                   const std::optional<at::Tensor>& pref_in, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "aligned_mtl_weights: scale_mode index must be 0..2");
  const at::Tensor K = as_blocks(K_in, "aligned_mtl_weights");
  const int64_t n = K.size(-1), B = K.numel() / (n * n);
  const std::vector<double> pref =
      pref_vector(pref_in, n, 1.0 / static_cast<double>(n), "aligned_mtl_weights");
  at::Tensor out = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  const double eps = dtype_eps(K_in);
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      aligned_mtl_one(K.data_ptr<double>() + b * n * n, pref.data(), n, mode, eps,
                      out.data_ptr<double>() + b * n);
  });
  return out.to(K_in.scalar_type());
}

at::Tensor config_weights_cpu(const at::Tensor& K_in,
                              const std::optional<at::Tensor>& pref_in) {
  const at::Tensor K = as_blocks(K_in, "config_weights");
  const int64_t n = K.size(-1), B = K.numel() / (n * n);
  const std::vector<double> pref = pref_vector(pref_in, n, 1.0, "config_weights");
  at::Tensor out = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  const double eps = dtype_eps(K_in);
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      config_one(K.data_ptr<double>() + b * n * n, pref.data(), n, eps,
                 out.data_ptr<double>() + b * n);
  });
  return out.to(K_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> gradvac_sweep_cpu(const at::Tensor& K_in,
                                                     const at::Tensor& phi_in,
                                                     const at::Tensor& perms_in, double beta,
                                                     double eps) {
  const at::Tensor K = as_blocks(K_in, "gradvac_sweep");
  const int64_t n = K.size(-1), B = K.numel() / (n * n);
  TORCH_CHECK(phi_in.sizes() == K_in.sizes(), "gradvac_sweep: phi_hat must have the Gram's shape ",
              K_in.sizes(), ", got ", phi_in.sizes());
  TORCH_CHECK(perms_in.dim() == 2 && perms_in.size(0) == n && perms_in.size(1) == n - 1,
              "gradvac_sweep: perms must have shape (", n, ", ", n - 1, "), got ",
              perms_in.sizes());
  const at::Tensor perms = perms_in.to(at::kLong).contiguous();
  const int64_t* ord = perms.data_ptr<int64_t>();
  for (int64_t i = 0; i < n * (n - 1); ++i)
    TORCH_CHECK(ord[i] >= 0 && ord[i] < n - 1, "gradvac_sweep: perms must hold positions 0..",
                n - 2);
  at::Tensor phi = phi_in.to(at::kDouble).contiguous().clone();
  at::Tensor out = at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      gradvac_one(K.data_ptr<double>() + b * n * n, phi.data_ptr<double>() + b * n * n, ord, n,
                  beta, eps, out.data_ptr<double>() + b * n);
  });
  return {out.to(K_in.scalar_type()), phi.to(phi_in.scalar_type())};
}

// w * min(1, max_norm / sqrt(w^T K w)) per block (Nash-MTL's clip of |w @ G|).
at::Tensor clip_update_norm_cpu(const at::Tensor& w_in, const at::Tensor& K_in,
                                double max_norm) {
  const at::Tensor K = as_blocks(K_in, "clip_update_norm");
  const int64_t n = K.size(-1), B = K.numel() / (n * n);
  TORCH_CHECK(w_in.numel() == B * n && w_in.size(-1) == n,
              "clip_update_norm: w must have shape (..., ", n, "), got ", w_in.sizes());
  at::Tensor w = w_in.to(at::kDouble).contiguous().clone();
  double* pw = w.data_ptr<double>();
  const double* pk = K.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double sq = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) sq += pw[b * n + i] * pk[b * n * n + i * n + j] * pw[b * n + j];
    const double norm = std::sqrt(std::max(sq, 0.0));
    if (norm > max_norm)
      for (int64_t i = 0; i < n; ++i) pw[b * n + i] *= max_norm / norm;
  }
  return w.to(w_in.scalar_type());
}

// One GradNorm step per block (see gradnorm_update_reference): (new w, L(0), has L(0)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradnorm_update_cpu(
    const at::Tensor& K_in, const at::Tensor& w_in, const std::optional<at::Tensor>& losses_in,
    const at::Tensor& initial_in, const at::Tensor& has_initial_in, double alpha, double lr) {
  const at::Tensor K = as_blocks(K_in, "gradnorm_update");
  const int64_t n = K.size(-1), B = K.numel() / (n * n);
  TORCH_CHECK(w_in.numel() == B * n && initial_in.numel() == B * n &&
                  has_initial_in.numel() == B,
              "gradnorm_update: state shapes do not match the Gram's ", K_in.sizes());
  at::Tensor w = w_in.to(at::kDouble).contiguous().clone();
  at::Tensor initial = initial_in.to(at::kDouble).contiguous().clone();
  at::Tensor has = has_initial_in.to(at::kBool).contiguous().clone();
  at::Tensor losses;
  if (losses_in.has_value())
    losses = losses_in->to(at::kDouble).expand(w_in.sizes()).contiguous();
  double* pw = w.data_ptr<double>();
  double* pinit = initial.data_ptr<double>();
  bool* phas = has.data_ptr<bool>();
  const double* pk = K.data_ptr<double>();
  std::vector<double> norms(n), target(n);
  for (int64_t b = 0; b < B; ++b) {
    double* wb = pw + b * n;
    double mean_weighted = 0.0, mean_norm = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      norms[i] = std::sqrt(std::max(pk[b * n * n + i * n + i], 0.0));
      mean_weighted += wb[i] * norms[i];
      mean_norm += norms[i];
    }
    mean_weighted /= static_cast<double>(n);
    mean_norm /= static_cast<double>(n);
    std::fill(target.begin(), target.end(), mean_weighted);
    if (losses.defined()) {
      const double* lb = losses.data_ptr<double>() + b * n;
      double* ib = pinit + b * n;
      if (!phas[b]) std::copy(lb, lb + n, ib);
      phas[b] = true;
      double mean_ratio = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        target[i] = ib[i] != 0 ? lb[i] / ib[i] : 1.0;  // ratio, then target below
        mean_ratio += target[i];
      }
      mean_ratio /= static_cast<double>(n);
      for (int64_t i = 0; i < n; ++i) {
        const double rel = mean_ratio > 0 ? std::max(target[i] / mean_ratio, 0.0) : 1.0;
        target[i] = mean_weighted * std::pow(rel, alpha);
      }
    }
    const double denom = mean_norm > 0 ? mean_norm : 1.0;
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double diff = wb[i] * norms[i] - target[i];
      const double sign = static_cast<double>((diff > 0) - (diff < 0));
      wb[i] = std::max(wb[i] - lr * norms[i] * sign / denom, 0.0);
      total += wb[i];
    }
    for (int64_t i = 0; i < n; ++i)
      wb[i] = total > 0 ? wb[i] * (static_cast<double>(n) / total) : 1.0;
  }
  return {w.to(w_in.scalar_type()), initial.to(initial_in.scalar_type()), has};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.def("power_fixed_point(Tensor K, float alpha, int iters) -> Tensor");
  // CUDA kernels only (csrc/cuda/cuda_ops.cpp); on the CPU the ops run torch.linalg.eigh.
  m.def("imtl_weights(Tensor K, float sum_tol) -> Tensor");
  m.def("sym_eig(Tensor K) -> (Tensor, Tensor)");
  m.def("aligned_mtl_weights(Tensor K, Tensor? pref, int scale_mode) -> Tensor");
  m.def("config_weights(Tensor K, Tensor? pref) -> Tensor");
  m.def("clip_update_norm(Tensor w, Tensor K, float max_norm) -> Tensor");
  m.def("gradnorm_update(Tensor K, Tensor w, Tensor? losses, Tensor initial, Tensor has_initial,"
        " float alpha, float lr) -> (Tensor, Tensor, Tensor)");
  m.def("gradvac_sweep(Tensor K, Tensor phi_hat, Tensor perms, float beta, float eps)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("power_fixed_point", &power_fixed_point_cpu);
  m.impl("aligned_mtl_weights", &aligned_mtl_weights_cpu);
  m.impl("config_weights", &config_weights_cpu);
  m.impl("gradvac_sweep", &gradvac_sweep_cpu);
  m.impl("clip_update_norm", &clip_update_norm_cpu);
  m.impl("gradnorm_update", &gradnorm_update_cpu);
}

}  // namespace mtlfast
