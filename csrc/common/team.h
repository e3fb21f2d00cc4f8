// The "team" the shared T x T solvers (solver_core.h) run on: on the CPU one thread (rank 0,
// size 1, sync a no-op), on the GPU one thread block (csrc/cuda/solvers.cu defines BlockTeam).
//
// A team provides rank(), size(), sync() (a barrier of the whole team), and reductions whose
// result every rank receives: sum(v) adds the ranks' partial values in a fixed order (with one
// rank it is the partial itself: the serial CPU code's summation order is kept), max(v) (NaN
// partials ignored, as std::max(best, v) does),
// argmax(v, i) / argmin(v, i) (the best value, ties to the smallest index; NaN never wins;
// (+-inf, -1) when no rank has a candidate). Reductions are barriers too.
#pragma once

#if defined(__CUDACC__)
#define MTLFAST_HD __host__ __device__
#define MTLFAST_FORCEINLINE __forceinline__
#else
#define MTLFAST_HD
#define MTLFAST_FORCEINLINE inline
#endif

namespace mtlfast {
namespace core {

// A candidate of an arg-reduction: value and index (-1: none).
struct Arg {
  double v;
  int i;
};

// True when (v, i) beats (best.v, best.i) for a maximum: larger, or equal with a smaller index.
MTLFAST_HD MTLFAST_FORCEINLINE bool beats_max(double v, int i, const Arg& best) {
  return i >= 0 && (best.i < 0 || v > best.v || (v == best.v && i < best.i));
}
MTLFAST_HD MTLFAST_FORCEINLINE bool beats_min(double v, int i, const Arg& best) {
  return i >= 0 && (best.i < 0 || v < best.v || (v == best.v && i < best.i));
}

// The CPU team: one thread does everything, in the serial order.
struct SerialTeam {
  int rank() const { return 0; }
  int size() const { return 1; }
  void sync() const {}
  double sum(double v) const { return v; }
  double max(double v) const { return v; }
  Arg argmax(Arg a) const { return a; }
  Arg argmin(Arg a) const { return a; }
};

}  // namespace core
}  // namespace mtlfast
