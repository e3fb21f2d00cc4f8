// K = G G^T on the GPU, reading G once.
//
// G is cut into column chunks; each block owns one contiguous run of chunks, keeps its share of
// the upper triangle of K in registers while the columns stream through, and writes one
// partial K (packed upper triangle) to a workspace row. A second kernel sums the rows in
// block order: deterministic for a given device, no atomics.
//
//  T <= 8   "direct": every thread owns the whole upper triangle (<= 36 accumulators) and
//           reads 16-byte vectors of each row for its own columns; no shared memory.
//  T <= 64  "tiled": the block stages 112 columns of all rows in shared memory; the upper
//           triangle of an 8 x 8 grid of R x R tiles (R = 2, 4, 8) is 36 tiles, one per
//           thread, times 7 thread groups that split the 112 columns (4 float4 quads each).
//           Rows are stored so that the 8 tiles of one tile row sit in 8 different 16-byte
//           bank groups (slot i*8 + t for row t*R + i) and consecutive quads are skewed by one
//           slot, so both the stores and the float4 reads are free of bank conflicts.
//           The next stage is loaded into registers while the current one is computed.
//  T > 64   the 32 x 32 row-block kernel below: rows in blocks of 32, one grid row per pair
//           of row blocks (G is read once per row block).
#include "common.cuh"

namespace mtlfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 2048;       // workspace rows for T <= 64
constexpr int kStageCols = 112;        // tiled kernel: 7 groups x 4 quads x 4 columns
constexpr int kGroups = 7;
constexpr int kTiles = 36;             // upper triangle of the 8 x 8 tile grid
constexpr int kMaxFastT = 64;
__host__ __device__ inline int64_t npairs(int64_t T) { return T * (T + 1) / 2; }
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A run of columns [col0, col0 + ncols) of one matrix with row stride ld (elements).
struct Chunk {
  const void* ptr;
  int64_t ld, col0, ncols;
  bool vec;  // rows 16-byte aligned: vector loads allowed
};

// One matrix cut into n ranges of `span` columns (span a multiple of the kernel's unit).
struct FlatSource {
  const void* G;
  int64_t ld, P, span, n;
  bool vec;
  __device__ Chunk get(int64_t c) const {
    const int64_t c0 = c * span;
    return {G, ld, c0, P - c0 < span ? P - c0 : span, vec};
  }
};

template <typename Src> using GramFn = void (*)(Src, int, float*);

// ---------------------------------------------------------------------------------- T <= 8
template <typename T, int NT, typename Src>
__global__ void __launch_bounds__(kThreads, 2) gram_direct_kernel(Src src, int, float* ws) {
  constexpr int V = Vec<T>::kLanes;
  constexpr int NP = NT * (NT + 1) / 2;
  float acc[NP];
#pragma unroll
  for (int e = 0; e < NP; ++e) acc[e] = 0.f;
  for (int64_t c = blockIdx.x; c < src.n; c += gridDim.x) {
    const Chunk ch = src.get(c);
    const T* base = static_cast<const T*>(ch.ptr) + ch.col0;
    for (int64_t col = threadIdx.x * (int64_t)V; col < ch.ncols; col += kThreads * V) {
      float x[NT][V];
      if (ch.vec && col + V <= ch.ncols) {
        uint4 raw[NT];
#pragma unroll
        for (int r = 0; r < NT; ++r) raw[r] = load_vec(base + r * ch.ld + col);
#pragma unroll
        for (int r = 0; r < NT; ++r) unpack<T>(raw[r], x[r]);
      } else {
#pragma unroll
        for (int r = 0; r < NT; ++r) unpack<T>(load_vec_scalar(base + r * ch.ld + col, ch.ncols - col), x[r]);
      }
      int e = 0;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int j = i; j < NT; ++j, ++e) {
          float s = acc[e];
#pragma unroll
          for (int k = 0; k < V; ++k) s = fmaf(x[i][k], x[j][k], s);
          acc[e] = s;
        }
      }
    }
  }
  // Block sum in a fixed order: butterfly within warps, then warps in index order.
  __shared__ float red[kThreads / 32][NP];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int e = 0; e < NP; ++e) {
    float s = acc[e];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) red[warp][e] = s;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < NP; e += kThreads) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][e];
    ws[(int64_t)blockIdx.x * NP + e] = s;
  }
}

// --------------------------------------------------------------------------------- T <= 64
template <typename T, int R, typename Src>
__global__ void __launch_bounds__(kThreads, R == 8 ? 1 : 2)
    gram_tiled_kernel(Src src, int nT, float* ws) {
  constexpr int V = Vec<T>::kLanes;
  constexpr int kRows = 8 * R;
  constexpr int kQuads = kStageCols / 4;
  constexpr int kSlot = kRows + 1;  // float4 slots per quad; +1 skews consecutive quads
  constexpr int kVecPerRow = kStageCols / V;
  constexpr int kLoads = (kRows * kVecPerRow + kThreads - 1) / kThreads;
  static_assert(kRows * kRows * sizeof(float) <= kQuads * kSlot * sizeof(float4),
                "the partial K must fit in the stage buffer");
  __shared__ float4 S[kQuads * kSlot];

  const int tid = threadIdx.x;
  const int group = tid / kTiles, tile = tid % kTiles;
  int ti = 0, rem = tile;
  while (rem >= 8 - ti) { rem -= 8 - ti; ++ti; }
  const int tj = ti + rem;  // ti <= tj
  const bool active = group < kGroups && tj * R < nT;

  float acc[R][R];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < R; ++j) acc[i][j] = 0.f;
  uint4 buf[kLoads];

  // Vectors are numbered row-major (kVecPerRow per row): a warp reads contiguous bytes.
  auto load_stage = [&](const Chunk& ch, int64_t s0) {
    const T* base = static_cast<const T*>(ch.ptr) + ch.col0 + s0;
    const int64_t cols = ch.ncols - s0 < kStageCols ? ch.ncols - s0 : kStageCols;
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int e = tid + l * kThreads;
      const int r = e / kVecPerRow, cv = (e % kVecPerRow) * V;
      buf[l] = make_uint4(0u, 0u, 0u, 0u);
      if (r < nT && cv < cols) {
        const T* p = base + r * ch.ld + cv;
        buf[l] = (ch.vec && cv + V <= cols) ? load_vec(p) : load_vec_scalar(p, cols - cv);
      }
    }
  };
  auto store_stage = [&]() {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int e = tid + l * kThreads;
      const int r = e / kVecPerRow;
      if (r < kRows) {
        float f[V];
        unpack<T>(buf[l], f);
        const int slot = (r % R) * 8 + r / R;
#pragma unroll
        for (int h = 0; h < V / 4; ++h) {
          const int q = (e % kVecPerRow) * (V / 4) + h;
          S[q * kSlot + slot] = make_float4(f[4 * h], f[4 * h + 1], f[4 * h + 2], f[4 * h + 3]);
        }
      }
    }
  };
  auto compute = [&]() {
    if (!active) return;
#pragma unroll
    for (int qq = 0; qq < 4; ++qq) {
      const float4* Sq = S + (group * 4 + qq) * kSlot;
      float4 a[R];
#pragma unroll
      for (int i = 0; i < R; ++i) a[i] = Sq[i * 8 + ti];
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const float4 b = Sq[j * 8 + tj];
#pragma unroll
        for (int i = 0; i < R; ++i)
          acc[i][j] = fmaf(a[i].w, b.w, fmaf(a[i].z, b.z, fmaf(a[i].y, b.y,
                      fmaf(a[i].x, b.x, acc[i][j]))));
      }
    }
  };

  int64_t c = blockIdx.x;
  if (c < src.n) {
    Chunk ch = src.get(c);
    int64_t s0 = 0;
    load_stage(ch, s0);
    for (;;) {
      store_stage();
      __syncthreads();
      s0 += kStageCols;
      if (s0 >= ch.ncols) {
        c += gridDim.x;
        s0 = 0;
        if (c < src.n) ch = src.get(c);
      }
      const bool more = c < src.n;
      if (more) load_stage(ch, s0);  // in flight while this stage is computed
      compute();
      __syncthreads();
      if (!more) break;
    }
  }

  // Sum the 7 groups' tiles in group order into a kRows x kRows K in the stage buffer.
  float* Kb = reinterpret_cast<float*>(S);
  for (int g = 0; g < kGroups; ++g) {
    if (active && group == g) {
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < R; ++j) {
          float* dst = Kb + (ti * R + i) * kRows + tj * R + j;
          *dst = g == 0 ? acc[i][j] : *dst + acc[i][j];
        }
    }
    __syncthreads();
  }
  const int64_t NP = npairs(nT);
  for (int e = tid; e < nT * nT; e += kThreads) {
    const int i = e / nT, j = e % nT;
    if (j >= i) ws[blockIdx.x * NP + (int64_t)i * nT - (int64_t)i * (i - 1) / 2 + (j - i)] =
        Kb[i * kRows + j];
  }
}

// Workspace rows (one per block) summed in block order; K written in full.
__global__ void gram_finalize_kernel(const float* __restrict__ ws, int64_t nblk, int nT,
                                     float* __restrict__ K) {
  const int64_t NP = npairs(nT);
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= NP) return;
  float s = 0.f;
  for (int64_t b = 0; b < nblk; ++b) s += ws[b * NP + e];
  int64_t i = 0, rem = e;
  while (rem >= nT - i) { rem -= nT - i; ++i; }
  const int64_t j = i + rem;
  K[i * nT + j] = s;
  K[j * nT + i] = s;
}

template <typename T, typename Src> GramFn<Src> gram_kernel(int nT) {
  switch (nT) {
    case 1: return gram_direct_kernel<T, 1, Src>;
    case 2: return gram_direct_kernel<T, 2, Src>;
    case 3: return gram_direct_kernel<T, 3, Src>;
    case 4: return gram_direct_kernel<T, 4, Src>;
    case 5: return gram_direct_kernel<T, 5, Src>;
    case 6: return gram_direct_kernel<T, 6, Src>;
    case 7: return gram_direct_kernel<T, 7, Src>;
    case 8: return gram_direct_kernel<T, 8, Src>;
    default: break;
  }
  if (nT <= 16) return gram_tiled_kernel<T, 2, Src>;
  if (nT <= 32) return gram_tiled_kernel<T, 4, Src>;
  return gram_tiled_kernel<T, 8, Src>;
}

template <typename Src> int blocks_for(GramFn<Src> fn, int64_t work_items) {
  int64_t b = one_wave_blocks(fn, kThreads);
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<int>(work_items < b ? work_items : b);
}

cudaError_t finalize(const float* ws, int64_t nblk, int nT, float* K, cudaStream_t s) {
  const int64_t NP = npairs(nT);
  gram_finalize_kernel<<<static_cast<unsigned>(ceil_div(NP, 256)), 256, 0, s>>>(ws, nblk, nT, K);
  return cudaGetLastError();
}

template <typename T>
int gram_flat(const T* G, int nT, int64_t P, int64_t ld, float* K, float* ws, cudaStream_t s) {
  const GramFn<FlatSource> fn = gram_kernel<T, FlatSource>(nT);
  const int64_t unit = nT <= 8 ? kThreads * Vec<T>::kLanes : kStageCols;
  const int64_t units = ceil_div(P, unit);
  const int blocks = blocks_for(fn, units);
  const int64_t span = ceil_div(units, blocks) * unit;
  const FlatSource src{G, ld, P, span, ceil_div(P, span), rows_aligned16(G, ld, sizeof(T))};
  fn<<<static_cast<unsigned>(src.n), kThreads, 0, s>>>(src, nT, ws);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(finalize(ws, src.n, nT, K, s));
}

// ---------------------------------------------------------------------------------- T > 64
constexpr int kRowBlock = 32;
constexpr int kLargeCols = 32;
constexpr int kLargeMaxSplits = 1024;

__host__ __device__ inline int64_t row_blocks(int64_t T) { return ceil_div(T, kRowBlock); }

inline int64_t large_splits(int64_t P) {
  const int64_t s = ceil_div(P, 4 * kLargeCols);
  return s > kLargeMaxSplits ? kLargeMaxSplits : s;
}

template <typename T>
__global__ void gram_large_kernel(const T* __restrict__ G, int64_t nT, int64_t P, int64_t ld,
                                  float* __restrict__ ws) {
  __shared__ float A[kRowBlock][kLargeCols + 1];
  __shared__ float B[kRowBlock][kLargeCols + 1];
  const int64_t nb = row_blocks(nT);
  int64_t pair = blockIdx.y, bi = 0;
  while (pair >= nb - bi) { pair -= nb - bi; ++bi; }
  const int64_t bj = bi + pair;
  const int64_t r0 = bi * kRowBlock, c0 = bj * kRowBlock;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  for (int64_t col = blockIdx.x * (int64_t)kLargeCols; col < P;
       col += (int64_t)gridDim.x * kLargeCols) {
    for (int e = threadIdx.x; e < kRowBlock * kLargeCols; e += kThreads) {
      const int r = e / kLargeCols, c = e % kLargeCols;
      const int64_t p = col + c;
      const bool in_p = p < P;
      A[r][c] = (in_p && r0 + r < nT) ? to_float(G[(r0 + r) * ld + p]) : 0.f;
      B[r][c] = (in_p && c0 + r < nT) ? to_float(G[(c0 + r) * ld + p]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kLargeCols; ++c) {
      const float a0 = A[2 * ty][c], a1 = A[2 * ty + 1][c];
      const float b0 = B[2 * tx][c], b1 = B[2 * tx + 1][c];
      acc[0][0] += a0 * b0; acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0; acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
  float* out = ws + ((int64_t)blockIdx.y * gridDim.x + blockIdx.x) * kRowBlock * kRowBlock;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) out[(2 * ty + i) * kRowBlock + 2 * tx + j] = acc[i][j];
}

__global__ void gram_large_reduce_kernel(const float* __restrict__ ws, int64_t nT, int splits,
                                         float* __restrict__ K) {
  const int64_t nb = row_blocks(nT);
  int64_t pair = blockIdx.x, bi = 0;
  while (pair >= nb - bi) { pair -= nb - bi; ++bi; }
  const int64_t bj = bi + pair;
  for (int e = threadIdx.x; e < kRowBlock * kRowBlock; e += blockDim.x) {
    const int64_t i = bi * kRowBlock + e / kRowBlock, j = bj * kRowBlock + e % kRowBlock;
    if (i >= nT || j >= nT) continue;
    const float* src = ws + (int64_t)blockIdx.x * splits * kRowBlock * kRowBlock + e;
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += src[(int64_t)k * kRowBlock * kRowBlock];
    K[i * nT + j] = s;
    K[j * nT + i] = s;
  }
}

template <typename T>
int gram_large(const T* G, int64_t nT, int64_t P, int64_t ld, float* K, float* ws,
               cudaStream_t s) {
  const int64_t nb = row_blocks(nT);
  const int splits = static_cast<int>(large_splits(P));
  dim3 grid(splits, static_cast<unsigned>(nb * (nb + 1) / 2));
  gram_large_kernel<T><<<grid, kThreads, 0, s>>>(G, nT, P, ld, ws);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  gram_large_reduce_kernel<<<static_cast<unsigned>(nb * (nb + 1) / 2), 256, 0, s>>>(ws, nT,
                                                                                   splits, K);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace mtlfast

extern "C" int64_t mtlfast_cuda_gram_workspace(int64_t T, int64_t P) {
  using namespace mtlfast;
  if (T <= kMaxFastT) return kMaxBlocks * npairs(T);
  const int64_t nb = row_blocks(T);
  return nb * (nb + 1) / 2 * large_splits(P) * kRowBlock * kRowBlock;
}

extern "C" int mtlfast_cuda_gram(const void* G, int dtype, int64_t T, int64_t P, int64_t ld,
                                 float* K, float* workspace, void* stream) {
  using namespace mtlfast;
  if (T <= 0 || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (T > kMaxFastT) {
    MTLFAST_DISPATCH_DTYPE(dtype, return gram_large(static_cast<const scalar_t*>(G), T, P, ld,
                                                    K, workspace, s));
  }
  MTLFAST_DISPATCH_DTYPE(dtype, return gram_flat(static_cast<const scalar_t*>(G),
                                                 static_cast<int>(T), P, ld, K, workspace, s));
  return static_cast<int>(cudaErrorInvalidValue);
}
