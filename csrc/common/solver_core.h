// The T x T solvers of the Gram methods, written once for the CPU ops (csrc/cpu, a SerialTeam:
// one thread, the serial order of the original C++ kernels) and the CUDA kernels (csrc/cuda/
// solvers.cu, a BlockTeam: one thread block per problem, workspace in shared memory). The torch
// references in mtlfast/ops/solvers.py and solvers_nonlinear.py are the spec; these follow them
// step for step (see each function).
//
// Parallel pattern: index loops are strided over the team (`for (i = first(lo); i < n; i += sz)`)
// and separated by sync(); dot products that a later step reads back are "owned": entry a is
// written by rank a % size, and each rank's partial sum reads only entries it owns, so the
// substitutions need one team reduction per row and no extra barrier. Scalars (pivots, step
// sizes, flags) come out of team reductions, so every rank holds the same copy and takes the
// same branch.
#pragma once

#include <math.h>

#include "team.h"

namespace mtlfast {
namespace core {

constexpr double kInf = __builtin_huge_val();
constexpr double kDoubleMin = 2.2250738585072014e-308;  // std::numeric_limits<double>::min()
constexpr double kEps64 = 2.220446049250313e-16;

MTLFAST_HD MTLFAST_FORCEINLINE bool finite(double x) { return isfinite(x); }
// std::max / std::min semantics (the first argument wins unless the second compares better).
MTLFAST_HD MTLFAST_FORCEINLINE double max_(double a, double b) { return a < b ? b : a; }
MTLFAST_HD MTLFAST_FORCEINLINE double min_(double a, double b) { return b < a ? b : a; }

// The first index >= lo owned by rank rk of sz (owner of index i: i % sz).
// sum_a row[idx[a]] * z[idx[a]] (idx null: sum_a row[a] * z[a]) over a < n, in four partial
// sums: one running sum is a chain of dependent adds, latency-bound at large T.
MTLFAST_HD MTLFAST_FORCEINLINE double dot4(const double* row, const double* z, const int* idx,
                                           int n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int a = 0;
  for (; a + 4 <= n; a += 4) {
    const int i0 = idx ? idx[a] : a, i1 = idx ? idx[a + 1] : a + 1;
    const int i2 = idx ? idx[a + 2] : a + 2, i3 = idx ? idx[a + 3] : a + 3;
    s0 += row[i0] * z[i0];
    s1 += row[i1] * z[i1];
    s2 += row[i2] * z[i2];
    s3 += row[i3] * z[i3];
  }
  for (; a < n; ++a) {
    const int i = idx ? idx[a] : a;
    s0 += row[i] * z[i];
  }
  return (s0 + s1) + (s2 + s3);
}

MTLFAST_HD MTLFAST_FORCEINLINE int first_owned(int lo, int rk, int sz) {
  return lo + ((rk - lo % sz) + sz) % sz;
}

// ------------------------------------------------------------------- triangular solves

// Which triangle a column-oriented solve walks: unknown c appears in equation i with the
// coefficient L[i * ld + c] (kLower: forward, i > c; kUpper: backward, i < c) or L[c * ld + i]
// (kLowerT, the transpose of a lower factor: backward, i < c).
enum TriKind { kLower, kLowerT, kUpper };

// The multi-rank form of a triangular solve: column by column, each unknown from its own
// (already updated) right-hand side, then one strided update of the remaining equations and
// one barrier, instead of one team reduction per row. The serial team keeps the row-by-row dot
// products of the original CPU kernels (bitwise-identical results); the two orders differ by
// rounding only. r0 (and r1 when not null) hold the right-hand sides, the solution on return.
// False when check_finite and a solution entry is not finite (every rank sees the same value).
template <class Team>
MTLFAST_HD bool tri_solve_cols(Team& tm, const double* L, int ld, double* r0, double* r1, int n,
                               TriKind kind, bool check_finite) {
  const int rk = tm.rank(), sz = tm.size();
  const bool forward = kind == kLower;
  bool ok = true;
  for (int step = 0; step < n; ++step) {
    const int c = forward ? step : n - 1 - step;
    const double d = L[c * ld + c];
    const double x0 = r0[c] / d, x1 = r1 ? r1[c] / d : 0.0;
    if (check_finite && !(finite(x0) && (!r1 || finite(x1)))) {
      ok = false;
      break;
    }
    const int lo = forward ? c + 1 : 0, hi = forward ? n : c;
    for (int i = lo + rk; i < hi; i += sz) {
      const double coef = kind == kLowerT ? L[c * ld + i] : L[i * ld + c];
      r0[i] -= coef * x0;
      if (r1) r1[i] -= coef * x1;
    }
    tm.sync();  // every rank has read r[c]; the next column never touches entry c
    if (c % sz == rk) {
      r0[c] = x0;
      if (r1) r1[c] = x1;
    }
  }
  tm.sync();
  return ok;
}

// -------------------------------------------------------------------------------- LU solves

// M y = r0 (and = r1 when r1 is not null) in place, M n x n row-major, by Gaussian elimination
// with partial pivoting; false for a zero (or NaN) pivot or a non-finite result. The nnqp/CAGrad
// variant (csrc/cpu/solvers.cpp's original lu_solve).
template <class Team>
MTLFAST_HD bool lu_solve(Team& tm, double* M, double* r0, double* r1, int n) {
  const int rk = tm.rank(), sz = tm.size();
  for (int c = 0; c < n; ++c) {
    if (isnan(M[c * n + c])) {
      tm.sync();
      return false;
    }
    Arg loc{-kInf, -1};
    for (int i = c + ((rk - c % sz) + sz) % sz; i < n; i += sz) {
      const double v = fabs(M[i * n + c]);
      if (v > loc.v) loc = Arg{v, i};
    }
    const Arg best = tm.argmax(loc);
    if (!(best.v > 0.0)) return false;
    const int p = best.i;
    if (p != c) {
      for (int k = rk; k < n; k += sz) {
        const double t = M[c * n + k];
        M[c * n + k] = M[p * n + k];
        M[p * n + k] = t;
      }
      if (rk == 0) {
        double t = r0[c];
        r0[c] = r0[p];
        r0[p] = t;
        if (r1) {
          t = r1[c];
          r1[c] = r1[p];
          r1[p] = t;
        }
      }
      tm.sync();
    }
    const double inv = 1.0 / M[c * n + c];
    for (int i = c + 1 + rk; i < n; i += sz) {
      const double f = M[i * n + c] * inv;
      if (f == 0.0) continue;
      for (int k = c + 1; k < n; ++k) M[i * n + k] -= f * M[c * n + k];
      r0[i] -= f * r0[c];
      if (r1) r1[i] -= f * r1[c];
    }
    tm.sync();
  }
  if (sz > 1) return tri_solve_cols(tm, M, n, r0, r1, n, kUpper, true);
  bool ok = true;
  for (int c = n - 1; c >= 0; --c) {
    const bool own = c % sz == rk;
    double s0 = own ? r0[c] : 0.0, s1 = own && r1 ? r1[c] : 0.0;
    for (int k = first_owned(c + 1, rk, sz); k < n; k += sz) {
      s0 -= M[c * n + k] * r0[k];
      if (r1) s1 -= M[c * n + k] * r1[k];
    }
    s0 = tm.sum(s0);
    const double v0 = s0 / M[c * n + c];
    ok = ok && finite(v0);
    if (own) r0[c] = v0;
    if (r1) {
      s1 = tm.sum(s1);
      const double v1 = s1 / M[c * n + c];
      ok = ok && finite(v1);
      if (own) r1[c] = v1;
    }
    if (!ok) break;  // every rank saw the same values
  }
  tm.sync();
  return ok;
}

// ------------------------------------------------------------------ non-negative / simplex QP

// Row k of the Cholesky factor L (leading dimension T) of A restricted to ord[0..k), for the
// index j (= ord[k] when rebuilding): L_{<k} l = a, then the diagonal. `rebuild` reads
// a_c = A[j, ord[c]] (the original chol_rebuild), otherwise A[ord[c], j] (chol_append); the
// same for a symmetric A. False when not positive definite.
template <class Team>
MTLFAST_HD bool chol_row(Team& tm, const double* A, int T, const int* ord, double* L, int k,
                         int j, bool rebuild) {
  const int rk = tm.rank(), sz = tm.size();
  double* row = L + k * T;
  double d;
  if (sz == 1) {  // row-by-row dot products
    for (int c = 0; c < k; ++c)
      row[c] = ((rebuild ? A[j * T + ord[c]] : A[ord[c] * T + j]) -
                dot4(L + c * T, row, nullptr, c)) / L[c * T + c];
    d = A[j * T + j] - dot4(row, row, nullptr, k);
  } else {
    for (int c = rk; c < k; c += sz) row[c] = rebuild ? A[j * T + ord[c]] : A[ord[c] * T + j];
    tm.sync();
    tri_solve_cols(tm, L, T, row, static_cast<double*>(nullptr), k, kLower, false);
    d = 0.0;
    for (int c = rk; c < k; c += sz) d -= row[c] * row[c];
    d = A[j * T + j] + tm.sum(d);
  }
  if (!(d > 0.0)) return false;
  if (rk == 0) row[k] = sqrt(d);
  tm.sync();
  return true;
}

// Workspace of nnqp_solve: doubles and ints.
MTLFAST_HD inline int nnqp_ws_doubles(int T) { return (T + 1) * (T + 1) + 3 * T + 1; }
MTLFAST_HD inline int nnqp_ws_ints(int T) { return 3 * T; }

// One problem: x = argmin 1/2 x^T A x + b^T x, x >= 0 (and sum x = 1 when simplex), A T x T.
// Steps 0-4 of nnqp_reference (mtlfast/ops/solvers.py); each problem stops as soon as it has
// converged. Non-negative case: the support system A_SS is kept as a Cholesky factor grown by
// one row per added index and rebuilt after a drop; LU of the assembled (bordered, for the
// simplex) system otherwise. x: T outputs (team-visible memory).
template <class Team>
MTLFAST_HD void nnqp_solve(Team& tm, const double* A, const double* b, int T, bool simplex,
                           long long steps, double tol, double* x, double* ws, int* iws) {
  const int rk = tm.rank(), sz = tm.size();
  double* big = ws;  // L (T x T, leading dimension T) or the assembled system (n x n)
  double* z = big + (T + 1) * (T + 1);
  double* grad = z + T;
  double* r = grad + T;  // T + 1
  int* S = iws;
  int* idx_buf = S + T;
  int* ord = idx_buf + T;
  int nord = 0;
  bool chol = !simplex;
  for (int i = rk; i < T; i += sz) {
    x[i] = 0.0;
    S[i] = 0;
  }
  if (simplex) {
    Arg loc{kInf, -1};
    for (int j = rk; j < T; j += sz) {
      const double v = 0.5 * A[j * T + j] + b[j];
      if (v < loc.v) loc = Arg{v, j};
    }
    const Arg best = tm.argmin(loc);  // a barrier: x and S are written
    const int j0 = best.i < 0 ? 0 : best.i;
    if (rk == 0) {
      S[j0] = 1;
      x[j0] = 1.0;
    }
  }
  tm.sync();
  for (long long step = 0; step < steps; ++step) {
    // Step 1: the equality-constrained solve on the support.
    const int* idx;
    int k;
    if (chol && sz > 1) {
      idx = ord;
      k = nord;
      for (int a = rk; a < k; a += sz) r[a] = -b[ord[a]];
      tm.sync();
      tri_solve_cols(tm, big, T, r, static_cast<double*>(nullptr), k, kLower, false);
      if (!tri_solve_cols(tm, big, T, r, static_cast<double*>(nullptr), k, kLowerT, true))
        break;  // step 4: freeze
    } else if (chol) {
      idx = ord;
      k = nord;
      // One thread (sz == 1: the team path is the branch above).
      for (int a = 0; a < k; ++a) r[a] = (-b[ord[a]] - dot4(big + a * T, r, nullptr, a)) /
                                        big[a * T + a];
      // L^T r = y by rows of L: contiguous reads and independent updates (no add chain).
      bool ok = true;
      for (int a = k - 1; a >= 0 && ok; --a) {
        const double v = r[a] / big[a * T + a];
        ok = finite(v);
        r[a] = v;
        for (int m = 0; m < a; ++m) r[m] -= big[a * T + m] * v;
      }
      if (!ok) break;  // step 4: freeze
    } else {
      idx = idx_buf;
      k = 0;
      for (int i = 0; i < T; ++i) k += S[i] != 0;
      if (rk == 0) {
        int a = 0;
        for (int i = 0; i < T; ++i)
          if (S[i]) idx_buf[a++] = i;
      }
      tm.sync();
      const int n = simplex ? k + 1 : k;
      for (int a = rk; a < n; a += sz) {
        double* row = big + a * n;
        if (a < k) {
          for (int c = 0; c < k; ++c) row[c] = A[idx[a] * T + idx[c]];
          if (simplex) row[k] = 1.0;
          r[a] = -b[idx[a]];
        } else {  // the simplex border
          for (int c = 0; c < k; ++c) row[c] = 1.0;
          row[k] = 0.0;
          r[k] = 1.0;
        }
      }
      tm.sync();
      if (n > 0 && !lu_solve(tm, big, r, static_cast<double*>(nullptr), n)) break;  // step 4
    }
    for (int i = rk; i < T; i += sz) z[i] = 0.0;
    tm.sync();
    int bad = 0;
    for (int a = rk; a < k; a += sz) {
      z[idx[a]] = r[a];
      bad += !(r[a] > 0.0);
    }
    const bool feasible = tm.sum(static_cast<double>(bad)) == 0.0;  // a barrier: z is written
    if (feasible) {
      // Step 2: accept z; add the most violated multiplier or stop.
      double lam = 0.0;
      for (int i = rk; i < T; i += sz) {
        x[i] = z[i];
        const double g = b[i] + dot4(A + i * T, z, idx, k);
        grad[i] = g;
        lam += z[i] * g;
      }
      lam = tm.sum(lam);
      if (!simplex) lam = 0.0;
      Arg loc{-kInf, -1};
      for (int i = rk; i < T; i += sz) {
        if (S[i]) continue;
        const double mu = lam - grad[i];
        if (mu > loc.v) loc = Arg{mu, i};
      }
      const Arg best = tm.argmax(loc);
      if (!(best.v > tol)) break;
      const int j = best.i;
      if (rk == 0) S[j] = 1;
      if (chol) {
        chol = chol_row(tm, A, T, ord, big, nord, j, false);
        if (chol) {
          if (rk == 0) ord[nord] = j;
          ++nord;
        }
      }
      tm.sync();
    } else {
      // Step 3: move towards z until the first support index reaches zero; drop it.
      Arg loc{kInf, -1};
      for (int a = rk; a < k; a += sz) {
        const int i = idx[a];
        if (z[i] > 0.0) continue;
        const double ratio = x[i] / max_(x[i] - z[i], kDoubleMin);
        if (ratio < loc.v) loc = Arg{ratio, a};
      }
      const Arg best = tm.argmin(loc);
      if (best.i < 0) break;  // no blocking index (non-finite values): freeze
      const int kb = idx[best.i];
      const double alpha = min_(max_(best.v, 0.0), 1.0);
      for (int a = rk; a < k; a += sz) {
        const int i = idx[a];
        x[i] = max_(x[i] + alpha * (z[i] - x[i]), 0.0);
      }
      tm.sync();
      if (rk == 0) x[kb] = 0.0;
      tm.sync();
      for (int a = rk; a < k; a += sz) S[idx[a]] = x[idx[a]] > 0.0;
      tm.sync();
      if (!simplex) {
        nord = 0;
        for (int i = 0; i < T; ++i) nord += S[i] != 0;
        if (rk == 0) {
          int a = 0;
          for (int i = 0; i < T; ++i)
            if (S[i]) ord[a++] = i;
        }
        tm.sync();
        chol = true;
        for (int a = 0; a < nord && chol; ++a) chol = chol_row(tm, A, T, ord, big, a, ord[a], true);
      }
    }
  }
  tm.sync();
}

// ------------------------------------------------------------------------------------ CAGrad

template <class Team>
MTLFAST_HD double quad(Team& tm, const double* A, const double* u, const double* v, int T) {
  double s = 0.0;
  for (int i = tm.rank(); i < T; i += tm.size()) {
    double t = 0.0;
    for (int j = 0; j < T; ++j) t += A[i * T + j] * v[j];
    s += u[i] * t;
  }
  return tm.sum(s);
}

MTLFAST_HD inline int cagrad_ws_doubles(int T) { return nnqp_ws_doubles(T) + 6 * T + 2; }
MTLFAST_HD inline int cagrad_ws_ints(int T) { return nnqp_ws_ints(T) + T; }

// CAGrad's inner problem: the steps of cagrad_weights_reference (mtlfast/ops/solvers.py), stopping
// once beta is a fixed point (the remaining steps would repeat it exactly). w: T outputs.
template <class Team>
MTLFAST_HD void cagrad_solve(Team& tm, const double* A, const double* p, int T, double c,
                             long long root_steps, long long qp_steps, double tol, double* w,
                             double* ws, int* iws) {
  const int rk = tm.rank(), sz = tm.size();
  double* big = ws;
  double* a = ws + nnqp_ws_doubles(T);
  double* b = a + T;
  double* w0 = b + T;
  double* w1 = w0 + T;
  double* r0 = w1 + T;  // T + 1
  double* r1 = r0 + T + 1;  // T + 1
  int* idx = iws + nnqp_ws_ints(T);
  double max_diag = 0.0;
  for (int i = rk; i < T; i += sz) {
    double t = 0.0;
    for (int j = 0; j < T; ++j) t += A[i * T + j] * p[j];
    a[i] = t;
    max_diag = max_(max_diag, A[i * T + i]);
  }
  max_diag = tm.max(max_diag);  // a barrier: a is written
  const double r = c * sqrt(max_(quad(tm, A, p, p, T), 0.0));
  double lo = 0.0, hi = r > 0.0 ? sqrt(max_diag) / r : 1.0, beta = hi / 2;
  for (long long it = 0; it < root_steps; ++it) {
    for (int i = rk; i < T; i += sz) b[i] = beta * a[i];
    tm.sync();
    nnqp_solve(tm, A, b, T, true, qp_steps, tol, w, ws, iws);
    const double phi = sqrt(max_(quad(tm, A, w, w, T), 0.0)) - r * beta;
    if (phi >= 0.0) lo = beta;
    if (phi <= 0.0) hi = beta;
    int k = 0;
    for (int i = 0; i < T; ++i) k += w[i] > 0.0;
    if (rk == 0) {
      int x = 0;
      for (int i = 0; i < T; ++i)
        if (w[i] > 0.0) idx[x++] = i;
    }
    tm.sync();
    const int n = k + 1;
    for (int x = rk; x < n; x += sz) {
      double* row = big + x * n;
      if (x < k) {
        for (int y = 0; y < k; ++y) row[y] = A[idx[x] * T + idx[y]];
        row[k] = 1.0;
        r0[x] = 0.0;
        r1[x] = -a[idx[x]];
      } else {
        for (int y = 0; y < k; ++y) row[y] = 1.0;
        row[k] = 0.0;
        r0[k] = 1.0;
        r1[k] = 0.0;
      }
    }
    tm.sync();
    double next = (lo + hi) / 2;
    if (lu_solve(tm, big, r0, r1, n)) {
      for (int i = rk; i < T; i += sz) w0[i] = w1[i] = 0.0;
      tm.sync();
      for (int x = rk; x < k; x += sz) {
        w0[idx[x]] = r0[x];
        w1[idx[x]] = r1[x];
      }
      tm.sync();
      const double qa = quad(tm, A, w1, w1, T) - r * r;
      const double qb = quad(tm, A, w0, w1, T);
      const double qc = quad(tm, A, w0, w0, T);
      const double disc = qb * qb - qa * qc;
      const double root = qc / (-qb + sqrt(max_(disc, 0.0)));
      if (finite(root) && disc >= 0.0 && root >= lo && root <= hi) next = root;
    }
    if (next == beta) return;  // a fixed point: w is already the QP solution at beta
    beta = next;
  }
  for (int i = rk; i < T; i += sz) b[i] = beta * a[i];
  tm.sync();
  nnqp_solve(tm, A, b, T, true, qp_steps, tol, w, ws, iws);
}

// --------------------------------------------------- Nash-MTL / FairGrad: K w = w^(-1/alpha)

constexpr double kDiagFloor = 1e-20;  // _DIAG_FLOOR in mtlfast/ops/solvers_nonlinear.py
constexpr int kLineSearch = 10;       // _LINE_SEARCH
constexpr double kArmijo = 1e-4;      // _ARMIJO

MTLFAST_HD MTLFAST_FORCEINLINE double barrier(double w, double p) {
  return p == 1.0 ? log(w) : pow(w, 1.0 - p) / (1.0 - p);
}

// H x = rhs in place for the symmetric H = Kn + diag(p w^(-p-1)) (n x n): Cholesky in place,
// or, when H is not numerically positive definite, H rebuilt and LU with partial pivoting. False
// when both fail (the original sym_solve of csrc/cpu/solvers_nonlinear.cpp).
template <class Team>
MTLFAST_HD bool newton_solve(Team& tm, double* H, double* rhs, const double* Kn, const double* w,
                             double p, int n) {
  const int rk = tm.rank(), sz = tm.size();
  bool spd = true;
  for (int j = 0; j < n; ++j) {
    double s = j % sz == rk ? H[j * n + j] : 0.0;
    for (int k = rk; k < j; k += sz) s -= H[j * n + k] * H[j * n + k];
    s = tm.sum(s);
    if (!(s > 0.0) || !finite(s)) {
      spd = false;
      break;
    }
    const double ljj = sqrt(s);
    for (int i = j + 1 + rk; i < n; i += sz) {
      double t = H[i * n + j];
      for (int k = 0; k < j; ++k) t -= H[i * n + k] * H[j * n + k];
      H[i * n + j] = t / ljj;
    }
    tm.sync();
    if (rk == 0) H[j * n + j] = ljj;  // read by nobody before the next barrier
  }
  tm.sync();
  if (spd && sz > 1) {
    tri_solve_cols(tm, H, n, rhs, static_cast<double*>(nullptr), n, kLower, false);
    tri_solve_cols(tm, H, n, rhs, static_cast<double*>(nullptr), n, kLowerT, false);
    return true;
  }
  if (spd) {
    for (int i = 0; i < n; ++i) {
      double t = i % sz == rk ? rhs[i] : 0.0;
      for (int k = rk; k < i; k += sz) t -= H[i * n + k] * rhs[k];
      t = tm.sum(t);
      if (i % sz == rk) rhs[i] = t / H[i * n + i];
    }
    for (int i = n - 1; i >= 0; --i) {
      double t = i % sz == rk ? rhs[i] : 0.0;
      for (int k = first_owned(i + 1, rk, sz); k < n; k += sz) t -= H[k * n + i] * rhs[k];
      t = tm.sum(t);
      if (i % sz == rk) rhs[i] = t / H[i * n + i];
    }
    tm.sync();
    return true;
  }
  for (int i = rk; i < n; i += sz) {
    for (int j = 0; j < n; ++j) H[i * n + j] = Kn[i * n + j];
    H[i * n + i] += p * pow(w[i], -p - 1.0);
  }
  tm.sync();
  for (int j = 0; j < n; ++j) {
    int piv = j;
    if (!isnan(H[j * n + j])) {
      Arg loc{-kInf, -1};
      for (int i = first_owned(j, rk, sz); i < n; i += sz) {
        const double v = fabs(H[i * n + j]);
        if (v > loc.v) loc = Arg{v, i};
      }
      piv = tm.argmax(loc).i;
    }
    if (H[piv * n + j] == 0.0) {
      tm.sync();
      return false;
    }
    tm.sync();
    if (piv != j) {
      for (int k = rk; k < n; k += sz) {
        const double t = H[j * n + k];
        H[j * n + k] = H[piv * n + k];
        H[piv * n + k] = t;
      }
      if (rk == 0) {
        const double t = rhs[j];
        rhs[j] = rhs[piv];
        rhs[piv] = t;
      }
      tm.sync();
    }
    for (int i = j + 1 + rk; i < n; i += sz) {
      const double m = H[i * n + j] / H[j * n + j];
      for (int k = j; k < n; ++k) H[i * n + k] -= m * H[j * n + k];
      rhs[i] -= m * rhs[j];
    }
    tm.sync();
  }
  if (sz > 1) {
    tri_solve_cols(tm, H, n, rhs, static_cast<double*>(nullptr), n, kUpper, false);
    return true;
  }
  for (int i = n - 1; i >= 0; --i) {
    double t = i % sz == rk ? rhs[i] : 0.0;
    for (int k = first_owned(i + 1, rk, sz); k < n; k += sz) t -= H[i * n + k] * rhs[k];
    t = tm.sum(t);
    if (i % sz == rk) rhs[i] = t / H[i * n + i];
  }
  tm.sync();
  return true;
}

MTLFAST_HD inline int power_fixed_point_ws_doubles(int n) { return 2 * n * n + 4 * n; }

// Positive root of K w = w^-p, p = 1/alpha: damped Newton on K / ||K||_F, then rescaled
// (power_fixed_point_reference; stops once a step changes w by less than 1e-13 relative).
// K: n x n (any memory), w: n outputs (team-visible memory).
template <class Team>
MTLFAST_HD void power_fixed_point_solve(Team& tm, const double* K, int n, double alpha,
                                        long long iters, double* w, double* ws) {
  const int rk = tm.rank(), sz = tm.size();
  const double p = 1.0 / alpha;
  double* Kn = ws;
  double* H = Kn + n * n;
  double* Kw = H + n * n;
  double* grad = Kw + n;
  double* step = grad + n;
  double* Ks = step + n;
  double s = 0.0;
  for (int i = rk; i < n; i += sz)
    for (int j = 0; j < n; ++j) {
      const double v = 0.5 * (K[i * n + j] + K[j * n + i]);
      Kn[i * n + j] = v;
      s += v * v;
    }
  s = sqrt(tm.sum(s));
  if (!(s > 0.0)) s = 1.0;
  for (int i = rk; i < n; i += sz) {
    for (int j = 0; j < n; ++j) Kn[i * n + j] /= s;
    w[i] = pow(max_(Kn[i * n + i], kDiagFloor), -alpha / (alpha + 1.0));
  }
  tm.sync();
  for (long long it = 0; it < iters; ++it) {
    for (int i = rk; i < n; i += sz) {
      double t = 0.0;
      for (int j = 0; j < n; ++j) t += Kn[i * n + j] * w[j];
      Kw[i] = t;
      grad[i] = t - pow(w[i], -p);
      step[i] = -grad[i];
      for (int j = 0; j < n; ++j) H[i * n + j] = Kn[i * n + j];
      H[i * n + i] += p * pow(w[i], -p - 1.0);
    }
    tm.sync();
    if (!newton_solve(tm, H, step, Kn, w, p, n))
      for (int i = rk; i < n; i += sz) step[i] = 0.0;
    double up = -kInf, down = up;
    for (int i = rk; i < n; i += sz) {
      if (!finite(step[i])) step[i] = 0.0;
      const double ratio = step[i] / w[i];
      up = max_(up, ratio);
      down = max_(down, -ratio / 0.9);
    }
    up = tm.max(up);  // a barrier: step is final
    down = tm.max(down);
    const double shrink = max_(max_(up, down), 1.0);
    double wKw = 0.0, sKw = 0.0, sKs = 0.0, h0 = 0.0, gs = 0.0;
    for (int i = rk; i < n; i += sz) {
      double t = 0.0;
      for (int j = 0; j < n; ++j) t += Kn[i * n + j] * step[j];
      Ks[i] = t;
      wKw += w[i] * Kw[i];
      sKw += step[i] * Kw[i];
      sKs += step[i] * t;
      h0 += barrier(w[i], p);
      gs += grad[i] * step[i];
    }
    wKw = tm.sum(wKw);
    sKw = tm.sum(sKw);
    sKs = tm.sum(sKs);
    h0 = tm.sum(h0);
    gs = tm.sum(gs);
    const double f0 = 0.5 * wKw - h0;
    const double slack = 8 * kEps64 * (0.5 * fabs(wKw) + fabs(h0));
    double t_acc = 0.0;
    double t = 1.0 / shrink;
    for (int k = 0; k < kLineSearch; ++k, t *= 0.5) {
      double h = 0.0;
      for (int i = rk; i < n; i += sz) h += barrier(w[i] + t * step[i], p);
      h = tm.sum(h);
      const double f = 0.5 * (wKw + 2 * t * sKw + t * t * sKs) - h;
      if (finite(f) && f <= f0 + kArmijo * t * gs + slack) {
        t_acc = t;
        break;
      }
    }
    double change = 0.0;
    for (int i = rk; i < n; i += sz) {
      change = max_(change, fabs(t_acc * step[i] / w[i]));
      w[i] += t_acc * step[i];
    }
    // The reference keeps iterating; from here on its steps change w by rounding only.
    if (tm.max(change) < 1e-13) break;
  }
  const double factor = pow(s, -alpha / (alpha + 1.0));
  for (int i = rk; i < n; i += sz) w[i] *= factor;
  tm.sync();
}

// --------------------------------------------------------- symmetric eigendecomposition

constexpr int kJacobiSweeps = 30;

MTLFAST_HD inline int jacobi_ws_doubles(int n) { return n + (n % 2) + 2; }

// Pair k of round `round` of the round-robin schedule of m players (m even): (0, q_0) for k = 0
// and (q_k, q_{m-1-k}) otherwise, q_i = (i + round) % (m - 1) + 1; returned with p < q.
MTLFAST_HD MTLFAST_FORCEINLINE void jacobi_pair(int k, int round, int m, int& p, int& q) {
  p = k == 0 ? 0 : (k + round) % (m - 1) + 1;
  q = k == 0 ? round % (m - 1) + 1 : (m - 1 - k + round) % (m - 1) + 1;
  if (p > q) {
    const int t = p;
    p = q;
    q = t;
  }
}

// Eigenvalues (diagonal of A on return) and eigenvectors (columns of V) of the symmetric A
// (n x n, destroyed) by the cyclic Jacobi method in round-robin order: each round rotates
// n/2 disjoint index pairs at once (one per rank), so a round costs three barriers. A pair is
// rotated while |a_pq| > eps sqrt(|a_pp a_qq|) (the relative criterion of Demmel & Veselic,
// 1992, which resolves small eigenvalues of a positive semi-definite A to high relative
// accuracy); sweeps stop when one rotates nothing (at most kJacobiSweeps).
template <class Team>
MTLFAST_HD void jacobi_eig(Team& tm, double* A, double* V, int n, double* ws) {
  const int rk = tm.rank(), sz = tm.size();
  const int m = n + (n % 2);  // players; index n is a bye when n is odd
  const int half = m / 2;
  double* cs = ws;  // (c, s) per pair
  for (int i = rk; i < n; i += sz)
    for (int j = 0; j < n; ++j) V[i * n + j] = i == j ? 1.0 : 0.0;
  tm.sync();
  if (n < 2) return;
  for (int sweep = 0; sweep < kJacobiSweeps; ++sweep) {
    double rotated = 0.0;
    for (int round = 0; round < m - 1; ++round) {
      // Pair k of this round: (0, q_0) and (q_k, q_{m-1-k}), q_i = (i + round) % (m-1) + 1.
      for (int k = rk; k < half; k += sz) {
        int p, q;
        jacobi_pair(k, round, m, p, q);
        double c = 1.0, s = 0.0;
        if (q < n) {
          const double app = A[p * n + p], aqq = A[q * n + q], apq = A[p * n + q];
          if (fabs(apq) > kEps64 * sqrt(fabs(app * aqq)) && finite(apq)) {
            const double tau = (aqq - app) / (2.0 * apq);
            const double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
            c = 1.0 / sqrt(1.0 + t * t);
            s = t * c;
            rotated += s != 0.0;
          }
        }
        cs[2 * k] = c;
        cs[2 * k + 1] = s;
      }
      tm.sync();
      // A <- J^T A (rows p, q of every pair), then A <- A J and V <- V J (columns p, q).
      for (int item = rk; item < half * n; item += sz) {
        const int k = item / n, j = item % n;
        const double c = cs[2 * k], s = cs[2 * k + 1];
        if (s == 0.0) continue;
        int p, q;
        jacobi_pair(k, round, m, p, q);
        const double apj = A[p * n + j], aqj = A[q * n + j];
        A[p * n + j] = c * apj - s * aqj;
        A[q * n + j] = s * apj + c * aqj;
      }
      tm.sync();
      for (int item = rk; item < half * n; item += sz) {
        const int k = item / n, i = item % n;
        const double c = cs[2 * k], s = cs[2 * k + 1];
        if (s == 0.0) continue;
        int p, q;
        jacobi_pair(k, round, m, p, q);
        const double aip = A[i * n + p], aiq = A[i * n + q];
        A[i * n + p] = c * aip - s * aiq;
        A[i * n + q] = s * aip + c * aiq;
        const double vip = V[i * n + p], viq = V[i * n + q];
        V[i * n + p] = c * vip - s * viq;
        V[i * n + q] = s * vip + c * viq;
      }
      tm.sync();
    }
    if (tm.sum(rotated) == 0.0) break;
  }
}

MTLFAST_HD inline int imtl_ws_doubles(int n) { return 2 * n * n + 3 * n + jacobi_ws_doubles(n); }

// IMTL-G (mtlfast/methods/imtl.py): w = v / sum(v), v = K^+ sqrt(diag K), the pseudo-inverse
// dropping eigenvalues <= n eps max|lambda|; w = 0 when |sum v| <= sum_tol sum|v|.
template <class Team>
MTLFAST_HD void imtl_solve(Team& tm, const double* K, int n, double sum_tol, double* w,
                           double* ws) {
  const int rk = tm.rank(), sz = tm.size();
  double* A = ws;
  double* V = A + n * n;
  double* d = V + n * n;
  double* coef = d + n;
  double* v = coef + n;
  double* jws = v + n;
  for (int i = rk; i < n; i += sz) {
    for (int j = 0; j < n; ++j) A[i * n + j] = K[i * n + j];
    d[i] = sqrt(max_(K[i * n + i], 0.0));
  }
  tm.sync();
  jacobi_eig(tm, A, V, n, jws);
  double top = 0.0;
  for (int i = rk; i < n; i += sz) top = max_(top, fabs(A[i * n + i]));
  const double cutoff = n * kEps64 * tm.max(top);
  for (int k = rk; k < n; k += sz) {
    const double lam = A[k * n + k];
    double t = 0.0;
    for (int i = 0; i < n; ++i) t += V[i * n + k] * d[i];
    coef[k] = lam > cutoff ? t / lam : 0.0;
  }
  tm.sync();
  double total = 0.0, mass = 0.0;
  for (int i = rk; i < n; i += sz) {
    double t = 0.0;
    for (int k = 0; k < n; ++k) t += V[i * n + k] * coef[k];
    v[i] = t;
    total += t;
    mass += fabs(t);
  }
  total = tm.sum(total);
  mass = tm.sum(mass);
  const bool ok = fabs(total) > sum_tol * mass;
  for (int i = rk; i < n; i += sz) w[i] = ok ? v[i] / total : 0.0;
  tm.sync();
}

MTLFAST_HD inline int sym_eig_ws_doubles(int n) { return 2 * n * n + jacobi_ws_doubles(n); }

// Eigenvalues in ascending order (lam, n) and matching eigenvectors (columns of V, n x n) of the
// symmetric part of K, by jacobi_eig. Outputs may be any memory.
template <class Team>
MTLFAST_HD void sym_eig_solve(Team& tm, const double* K, int n, double* lam, double* V_out,
                              double* ws) {
  const int rk = tm.rank(), sz = tm.size();
  double* A = ws;
  double* V = A + n * n;
  for (int i = rk; i < n; i += sz)
    for (int j = 0; j < n; ++j) A[i * n + j] = 0.5 * (K[i * n + j] + K[j * n + i]);
  tm.sync();
  jacobi_eig(tm, A, V, n, V + n * n);
  for (int i = rk; i < n; i += sz) {  // position of eigenvalue i in ascending order
    const double li = A[i * n + i];
    int pos = 0;
    for (int j = 0; j < n; ++j) {
      const double lj = A[j * n + j];
      pos += lj < li || (lj == li && j < i) || (isnan(li) && !isnan(lj));
    }
    lam[pos] = li;
    for (int r = 0; r < n; ++r) V_out[r * n + pos] = V[r * n + i];
  }
  tm.sync();
}

}  // namespace core
}  // namespace mtlfast
