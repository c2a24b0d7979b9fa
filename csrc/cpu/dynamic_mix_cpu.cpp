// The fused CPU kernels of the dynamixer_ops_C::dynamic_mix*_out ops (float32, float64, bfloat16, float16).
//
// Work is split into blocks of `nb` sequences (nb depends on the shape only, never on the thread count). For a
// block, reduce -> generate -> softmax over the source token -> apply run on block-local buffers (the L x L
// mixing matrices of one block stay in L2; nothing of size N*S*L*L is ever allocated), and the backward
// recomputes them. The weight gradients are reduced deterministically: the blocks are grouped into a fixed
// number of chunks (again from the shape only); each chunk sums its blocks in order into its own partial
// buffer, and the partials are added in chunk order in float64. The results are therefore bitwise identical
// run to run and for any thread count.
//
// The arithmetic lives in mix_cpu_kernels.inc, compiled here once per instruction set (AVX-512 with BF16,
// AVX-512, AVX2+FMA and the baseline x86-64/other target) and chosen at run time;
// DYNAMIXER_OPS_CPU_ISA=avx512bf16|avx512|avx2|generic forces one (tests use it to cover every path on one machine).
//
// bfloat16 and float16 inputs are staged: each block's rows of x (and dy) are widened to float32 block-local
// buffers, the float32 block kernels run on them, and y (grad_x) is rounded back; the weights are widened once per
// call and the weight gradients accumulate in float32 partials, so every sum runs in float32 (or float64). On
// AVX512-BF16, bfloat16 inputs skip the float32 staging: every product runs on the bf16 dot instruction (vdpbf16ps,
// twice the float32 FMA rate) with float32 sums, its operands bf16 as the upstream layer's bf16 step has them (x, dy
// and the weights as given; z, e^(G - max), P, dG and dr rounded); x and dy are staged per block as bf16 pairs in the
// layouts their products read (DotOperands). Where C/S is odd (a segment would start inside a pair) only the
// generate-sized GEMMs run on the dots and the rest is staged. The softmax, its backward and the bias gradients stay
// float32.
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#include "dynamic_mix.h"

namespace dynamixer_ops {
namespace {

// Pointers and strides of one call. x, dy and out (y or grad_x) are (A, B, L, C) with unit channel stride.
template <class T> struct MixArgs {
  int64_t A, B, L, C, S, d;
  const T* x; int64_t xA, xB, xL;
  const T* dy; int64_t dyA, dyB, dyL;
  T* out; int64_t oA, oB, oL;
  const T* Wc;   // (S*d, C)
  const T* WcT;  // (C, S*d)
  const T* bc;   // (S*d)
  const T* Wg;   // (L*L, L*d)
  const T* WgT;  // (L*d, L*L)
  const T* bg;   // (L*L)
  // bfloat16 inputs on AVX512-BF16 (see bf16_gemm): Wg^T and Wg packed as bf16 pairs, and their row strides
  const uint32_t* WgP = nullptr;  // pairs along L*d: the B operand of G = z Wg^T
  int64_t wgp_ld = 0;
  const uint32_t* WgR = nullptr;  // pairs along L*L: the B operand of dz = dG Wg
  int64_t wgr_ld = 0;
  // ... and when every product runs on the dots (see DotOperands): x and dy as given (strides as x's, dy's above),
  // Wc packed for r = x Wc^T and for dx += dr Wc.
  const uint16_t* x16 = nullptr;
  const uint16_t* dy16 = nullptr;
  const uint32_t* WcP = nullptr;  // pairs along C
  int64_t wcp_ld = 0;
  const uint32_t* WcR = nullptr;  // pairs along S*d
  int64_t wcr_ld = 0;
  // Backward with P kept by the forward: the block's probabilities, (nb*S, L, L) from its first sequence on.
  const T* probs = nullptr;
};

// The block-local bf16-pair operands when every product of bfloat16 inputs runs on AVX512-BF16's dots (C/S even,
// so that every segment starts on a pair). T = nb*L tokens, Lp = ceil(L/2) token pairs per sequence, M = nb*S.
struct DotOperands {
  uint16_t* xr;   // (T, C): the block's x rows, contiguous (pairs along C: the A of the reduce and of dP)
  uint32_t* xt;   // (nb*Lp, C): x as pairs of tokens (the B of the apply and of dWc); an odd L pads with zeros
  uint32_t* ep;   // (M, Lp, L): E as pairs of source tokens (forward: the A of the apply)
  uint16_t* dyr;  // (T, C): the block's dy rows (backward)
  uint32_t* dyc;  // (nb, C/2, L): dy as pairs of channels, transposed per sequence (the B of dP)
  uint32_t* dyt;  // (nb*Lp, C): dy as pairs of tokens (the B of dx = P dy)
  uint32_t* pr;   // (M*L, Lp): P's rows as pairs of target tokens (the A of dx = P dy)
  uint32_t* drt;  // (nb*Lp, S*d): dr as pairs of tokens (the A of dWc = dr^T x)
  uint32_t* drp;  // (T, ceil(S*d/2)): dr's rows as pairs (the A of dx += dr Wc)
  float* rows;    // (T, C): y or grad_x, for the caller to round to bf16
};

// Block-local buffers (M = nb*S rows of matrices).
template <class T> struct BlockBuffers {
  T* r;    // (nb*L, S*d): reduced values; in the backward reused for dr
  T* z;    // (M, L*d): r regrouped per segment, plus the compress bias
  T* g;    // (M, L*L): logits, then e^(G - max) (forward) or P (backward)
  T* inv;  // (M, L): 1 / column sums of e^(G - max)
  T* dp;   // (M, L*L): dP, then dG (backward only)
  T* dyT;  // (nb, C, L): dy transposed per sequence (backward only)
  T* dz;   // (M, L*d) (backward only)
  // When the generate GEMMs run on bf16 dots: their bf16-pair operands.
  uint32_t* zp = nullptr;   // (M, ceil(L*d / 2)): z, pairs along L*d
  uint32_t* ztp = nullptr;  // (L*d, ceil(M / 2)): z^T, pairs of matrices (backward only)
  uint32_t* dgb = nullptr;  // (ceil(M / 2), L*L rounded up to 16): dG, pairs of matrices (backward only)
  uint32_t* dga = nullptr;  // (M, ceil(L*L / 2)): dG, pairs along L*L (backward only)
  const DotOperands* dots = nullptr;  // set when every product runs on the bf16 dots
};

// One chunk's partial weight gradients.
template <class T> struct Partials {
  T* dWg;  // (L*L, L*d)
  T* dbg;  // (L*L)
  T* dWc;  // (S*d, C)
  T* dbc;  // (S*d)
};

}  // namespace

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define DMX_X86_MULTIVERSION 1
namespace isa_avx512bf16 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,bmi2")
#define DMX_VEC_BYTES 64
#define DMX_MR 6
#define DMX_NV 4
#define DMX_BF16_DOT 1
#include "mix_cpu_kernels.inc"
#undef DMX_BF16_DOT
#undef DMX_VEC_BYTES
#undef DMX_MR
#undef DMX_NV
#pragma GCC pop_options
}  // namespace isa_avx512bf16
namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")
#define DMX_VEC_BYTES 64
#define DMX_MR 6
#define DMX_NV 4
#include "mix_cpu_kernels.inc"
#undef DMX_VEC_BYTES
#undef DMX_MR
#undef DMX_NV
#pragma GCC pop_options
}  // namespace isa_avx512
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DMX_VEC_BYTES 32
#define DMX_MR 4
#define DMX_NV 3
#include "mix_cpu_kernels.inc"
#undef DMX_VEC_BYTES
#undef DMX_MR
#undef DMX_NV
#pragma GCC pop_options
}  // namespace isa_avx2
#endif
namespace isa_generic {  // the compiler's baseline target (SSE2 on x86-64)
#define DMX_VEC_BYTES 16
#define DMX_MR 4
#define DMX_NV 2
#include "mix_cpu_kernels.inc"
#undef DMX_VEC_BYTES
#undef DMX_MR
#undef DMX_NV
}  // namespace isa_generic

namespace {

enum class Isa { generic, avx2, avx512, avx512bf16 };

Isa best_isa() {
#ifdef DMX_X86_MULTIVERSION
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
      return __builtin_cpu_supports("avx512bf16") ? Isa::avx512bf16 : Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::generic;
  }();
  return best;
#else
  return Isa::generic;
#endif
}

// The instruction set to run: the best this CPU has, or a lower one forced by DYNAMIXER_OPS_CPU_ISA.
Isa chosen_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("DYNAMIXER_OPS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa isa;
  if (want == "avx512bf16") isa = Isa::avx512bf16;
  else if (want == "avx512") isa = Isa::avx512;
  else if (want == "avx2") isa = Isa::avx2;
  else if (want == "generic") isa = Isa::generic;
  else fail("dynamixer_ops: DYNAMIXER_OPS_CPU_ISA must be avx512bf16, avx512, avx2 or generic, got '", want, "'");
  DMX_CHECK(static_cast<int>(isa) <= static_cast<int>(best), "dynamixer_ops: DYNAMIXER_OPS_CPU_ISA=", want,
              " but this CPU (or build) only supports a lower instruction set");
  return isa;
}

// The kernels compiled for `isa`: `call` names the instruction set's namespace as `ns`.
#ifdef DMX_X86_MULTIVERSION
#define DMX_ISA_CASES(call)                                           \
  case Isa::avx512bf16: { namespace ns = isa_avx512bf16; call; return; } \
  case Isa::avx512: { namespace ns = isa_avx512; call; return; }         \
  case Isa::avx2: { namespace ns = isa_avx2; call; return; }
#else
#define DMX_ISA_CASES(call)
#endif
#define DMX_ON_ISA(isa, call)                                        \
  switch (isa) {                                                      \
    DMX_ISA_CASES(call)                                               \
    default: { namespace ns = isa_generic; call; return; }            \
  }

template <class T> void run_forward_block(Isa isa, const MixArgs<T>& a, int64_t n0, int64_t n1,
                                          const BlockBuffers<T>& w) {
  DMX_ON_ISA(isa, ns::forward_block(a, n0, n1, w))
}

template <class T> void run_backward_block(Isa isa, const MixArgs<T>& a, int64_t n0, int64_t n1,
                                           const BlockBuffers<T>& w, const Partials<T>& p) {
  DMX_ON_ISA(isa, ns::backward_block(a, n0, n1, w, p))
}

template <class H> void run_widen(Isa isa, const H* src, float* dst, int64_t n) {
  DMX_ON_ISA(isa, ns::widen(src, dst, n))
}

template <class H> void run_narrow(Isa isa, const float* src, H* dst, int64_t n) {
  DMX_ON_ISA(isa, ns::narrow(src, dst, n))
}

// The type the block kernels compute in: float32 for 16-bit storage.
template <class H> struct ComputeOf { using type = H; };
template <> struct ComputeOf<c10::BFloat16> { using type = float; };
template <> struct ComputeOf<c10::Half> { using type = float; };

// Whether the generate GEMM runs on AVX512-BF16's dot instruction: bfloat16 inputs on that path only.
template <class H> bool uses_bf16_dots(Isa isa) {
  return std::is_same_v<H, c10::BFloat16> && isa == Isa::avx512bf16;
}
// ... and every product: where each segment's channels start on a bf16 pair (C/S even).
template <class H> bool all_products_on_dots(Isa isa, const MixShape& sh) {
  return uses_bf16_dots<H>(isa) && (sh.C / sh.S) % 2 == 0;
}

template <class T> constexpr ScalarType scalar_type_of = torch::headeronly::CppTypeToScalarType<T>::value;

#if defined(__SANITIZE_ADDRESS__)
#define DMX_POISON_SCRATCH 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DMX_POISON_SCRATCH 1
#endif
#endif

// Uninitialized scratch of n values, 64-byte aligned as torch's CPU allocator aligns (the block kernels' buffers).
// Sanitized builds fill it with 0xff bytes, a NaN as float32, float64 and either half of a bf16 pair (ASan fills only
// the first 4 KiB of an allocation): a read of scratch that no kernel wrote shows as NaN in the results.
template <class V> std::unique_ptr<V, void (*)(void*)> scratch(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n) * sizeof(V) + 63) / 64 * 64;
  void* p = bytes ? std::aligned_alloc(64, bytes) : nullptr;
  DMX_CHECK(bytes == 0 || p != nullptr, "dynamixer_ops (cpu): could not allocate ", bytes, " bytes of workspace");
#ifdef DMX_POISON_SCRATCH
  if (p) std::memset(p, 0xff, bytes);
#endif
  return {static_cast<V*>(p), &std::free};
}

// Sequences per block: enough rows (nb*S) for the register tiles of the generate GEMM, while one block's
// mixing matrices (nb*S*L*L values) stay within `matrix_bytes`, so that a block's working set lives in L2; and
// at least ~16 blocks when the batch allows, so that the blocks spread over the threads. A function of the shape
// only (and of the direction), never of the thread count.
int64_t block_size(int64_t N, int64_t S, int64_t L, size_t elem, int64_t matrix_bytes) {
  const int64_t per_seq = S * L * L * static_cast<int64_t>(elem);
  const int64_t by_cache = std::max<int64_t>(1, matrix_bytes / per_seq);
  const int64_t by_spread = std::max<int64_t>(1, (N + 15) / 16);
  return std::max<int64_t>(1, std::min({by_cache, by_spread, N}));
}

// The backward streams its chunk's partial dWg (L*L x L*d) once per block, with the block's nb*S matrices as the
// GEMM's depth: bigger blocks than the forward's (P and dP together still fit a 2 MB L2) cut that traffic.
constexpr int64_t kForwardMatrixBytes = int64_t{128} << 10;
constexpr int64_t kBackwardMatrixBytes = int64_t{512} << 10;
// ... and at most this many sequences: with the spill in mix_backward_cpu, it bounds how many sequences any T
// (fp32) weight-gradient sum runs over (at 300k sequences a chunk-deep fp32 sum of dbc was 1.2e-5 off).
constexpr int64_t kMaxSumSequences = 128;

// Upper bound on the number of partial weight-gradient buffers (one per chunk of blocks). It caps the
// backward's parallelism, not its speed on this many or fewer threads; each buffer is ~(L*L*L*d) values.
constexpr int64_t kMaxChunks = 16;
// ... and fewer (not under kMinChunks) where the partials would pass kPartialBytes: each is zeroed and summed once
// per call (at DynaMixer-L stage 1 one is 1 MiB, and 16 of them cost ~10% of the backward).
constexpr int64_t kMinChunks = 8;
constexpr int64_t kPartialBytes = int64_t{8} << 20;

template <class T> struct BufferSizes {
  int64_t r, z, g, inv, dp, dyT, dz, zp, ztp, dgb, dga;
  int64_t total() const { return r + z + g + inv + dp + dyT + dz + zp + ztp + dgb + dga; }
};

template <class T> BufferSizes<T> buffer_sizes(int64_t nb, int64_t L, int64_t C, int64_t S, int64_t d,
                                               bool backward, bool bf16_pairs) {
  static_assert(sizeof(T) >= sizeof(uint32_t), "zp is carved from T values");
  const int64_t M = nb * S;
  // Each buffer is rounded up to 16 values so that every one starts 64-byte aligned.
  auto up = [](int64_t n) { return (n + 15) / 16 * 16; };
  BufferSizes<T> s;
  s.r = up(nb * L * S * d); s.z = up(M * L * d); s.g = up(M * L * L); s.inv = up(M * L);
  s.dp = backward ? up(M * L * L) : 0; s.dyT = backward ? up(nb * C * L) : 0; s.dz = backward ? up(M * L * d) : 0;
  s.zp = bf16_pairs ? up(M * ((L * d + 1) / 2)) : 0;
  const bool bwd_pairs = bf16_pairs && backward;
  s.ztp = bwd_pairs ? up(L * d * ((M + 1) / 2)) : 0;
  s.dgb = bwd_pairs ? up((M + 1) / 2 * up(L * L)) : 0;
  s.dga = bwd_pairs ? up(M * ((L * L + 1) / 2)) : 0;
  return s;
}

template <class T> BlockBuffers<T> carve(T* base, const BufferSizes<T>& s) {
  BlockBuffers<T> w;
  w.r = base; base += s.r;
  w.z = base; base += s.z;
  w.g = base; base += s.g;
  w.inv = base; base += s.inv;
  w.dp = base; base += s.dp;
  w.dyT = base; base += s.dyT;
  w.dz = base; base += s.dz;
  auto pairs = [&base](int64_t n) { uint32_t* p = n ? reinterpret_cast<uint32_t*>(base) : nullptr; base += n; return p; };
  w.zp = pairs(s.zp); w.ztp = pairs(s.ztp); w.dgb = pairs(s.dgb); w.dga = pairs(s.dga);
  return w;
}

// DotOperands' buffers in 32-bit words, each rounded up to 16 (64-byte aligned). The B operands (xt, dyc, dyt) get
// 16 words of slack: the GEMMs load a row's last vector whole.
struct DotSizes {
  int64_t xr, xt, ep, dyr, dyc, dyt, pr, drt, drp, rows;
  int64_t total() const { return xr + xt + ep + dyr + dyc + dyt + pr + drt + drp + rows; }
};

DotOperands carve_dots(int32_t* base, const DotSizes& s) {
  uint32_t* p = reinterpret_cast<uint32_t*>(base);
  auto take = [&p](int64_t n) { uint32_t* q = n ? p : nullptr; p += n; return q; };
  DotOperands o;
  o.xr = reinterpret_cast<uint16_t*>(take(s.xr)); o.xt = take(s.xt); o.ep = take(s.ep);
  o.dyr = reinterpret_cast<uint16_t*>(take(s.dyr)); o.dyc = take(s.dyc); o.dyt = take(s.dyt);
  o.pr = take(s.pr); o.drt = take(s.drt); o.drp = take(s.drp); o.rows = reinterpret_cast<float*>(take(s.rows));
  return o;
}

// One thread's workspace for the blocks it runs, forward or backward: the block buffers, the bf16-dot operands
// (where every product runs on the dots) and `staged` buffers of `rows` float32 values each (one block's x, dy or
// its result, for 16-bit inputs staged through float32).
template <class T> struct BlockScratch {
  static constexpr int kMaxStaged = 3;
  std::unique_ptr<T, void (*)(void*)> values;
  std::unique_ptr<int32_t, void (*)(void*)> words;
  DotOperands ops;
  BlockBuffers<T> w;
  T* staged[kMaxStaged] = {};

  BlockScratch(const BufferSizes<T>& sizes, const DotSizes& dot_words, bool all_dots, int64_t rows, int nstaged)
      : values(scratch<T>(sizes.total() + nstaged * rows)), words(scratch<int32_t>(dot_words.total())),
        ops(carve_dots(words.get(), dot_words)), w(carve(values.get(), sizes)) {
    if (all_dots) w.dots = &ops;
    for (int i = 0; i < nstaged && i < kMaxStaged; ++i) staged[i] = values.get() + sizes.total() + i * rows;
  }
  BlockScratch(const BlockScratch&) = delete;             // w.dots points at ops
  BlockScratch& operator=(const BlockScratch&) = delete;
};

// The host side of the AVX512-BF16 path, reached only where bfloat16 inputs run on its dots (uses_bf16_dots):
// compiled for every CPU, but named after that instruction set (isa_<set>_...), so that the coverage rule of
// .ci/sanitize (tools/native_coverage.py) counts these functions as that set's code, not as code every CPU runs.
namespace isa_avx512bf16_setup {

DotSizes dot_sizes(int64_t nb, int64_t L, int64_t C, int64_t S, int64_t d, bool backward) {
  auto up = [](int64_t n) { return (n + 15) / 16 * 16; };
  const int64_t T = nb * L, Lp = (L + 1) / 2, M = nb * S, Sd = S * d;
  DotSizes s{};
  s.xr = up(T * C / 2); s.xt = up(nb * Lp * C + 16); s.rows = up(T * C);
  s.ep = backward ? 0 : up(M * Lp * L);
  if (backward) {
    s.dyr = up(T * C / 2); s.dyc = up(nb * (C / 2) * L + 16); s.dyt = up(nb * Lp * C + 16);
    s.pr = up(M * L * Lp); s.drt = up(nb * Lp * Sd); s.drp = up(T * ((Sd + 1) / 2));
  }
  return s;
}

// Packings of a (R, K) bfloat16 matrix W as the B operand of a bf16-dot GEMM (see bf16_gemm): rows of bf16 pairs
// as int32, each row padded with zeros to a multiple of 16 pairs (the GEMM loads whole vectors), built with ATen's
// (vectorized, parallel) copies. The bf16 -> int32 views need freshly allocated tensors: contiguous() may keep any
// stride of a size-1 dimension, which view(dtype) rejects (L = d = 1 raised here).
// pairs_along_columns: (ceil(K/2), R padded): element [kp][r] = (W[r][2kp], W[r][2kp+1]), the B of X W^T.
Tensor pairs_along_columns(const Tensor& W) {
  using torch::stable::copy_;
  const int64_t R = W.size(0), K = W.size(1), Kp = (K + 1) / 2;
  Tensor even = zeros({R, 2 * Kp}, W.scalar_type(), W);  // an odd K padded with a zero column
  Tensor even_k = narrow(even, 1, 0, K);
  copy_(even_k, W);
  Tensor packed = zeros({Kp, (R + 15) / 16 * 16}, ScalarType::Int, W);
  Tensor packed_r = narrow(packed, 1, 0, R);
  copy_(packed_r, t2(view_as_dtype(even, ScalarType::Int)));
  return packed;
}
// pairs_along_rows: (ceil(R/2), K padded): element [rp][k] = (W[2rp][k], W[2rp+1][k]), the B of X W.
Tensor pairs_along_rows(const Tensor& W) {
  using torch::stable::copy_;
  using torch::stable::transpose;
  using torch::stable::view;
  const int64_t R = W.size(0), K = W.size(1), Rp = (R + 1) / 2;
  Tensor even = zeros({2 * Rp, K}, W.scalar_type(), W);  // an odd R padded with a zero row
  Tensor even_r = narrow(even, 0, 0, R);
  copy_(even_r, W);
  Tensor interleaved = empty({Rp, K, 2}, W.scalar_type(), W);
  copy_(interleaved, transpose(view(even, {Rp, 2, K}), 1, 2));
  Tensor packed = zeros({Rp, (K + 15) / 16 * 16}, ScalarType::Int, W);
  Tensor packed_k = narrow(packed, 1, 0, K);
  copy_(packed_k, torch::stable::squeeze(view_as_dtype(interleaved, ScalarType::Int), -1));
  return packed;
}

}  // namespace isa_avx512bf16_setup

// The weights in the compute type T (a view of the caller's for float32/float64, a float32 copy for 16-bit inputs;
// all tiny), their transposes (the GEMMs read B operands row by row), and Wg packed for the bf16 dots if used.
// `generate`: whether the generate GEMM runs (not in a backward that reads the forward's kept P): only then is
// Wg^T (or its bf16 packing, L*L x L*d values) needed.
template <class T> struct ComputeWeights {
  Tensor Wc, WcT, bc, Wg, WgT, bg, WgP, WgR, WcP, WcR;
};

template <class T> ComputeWeights<T> compute_weights(const Tensor& Wc, const Tensor& bc, const Tensor& Wg,
                                                     const Tensor& bg, bool bf16_pairs, bool all_dots,
                                                     bool backward, bool generate) {
  using torch::stable::contiguous;
  const ScalarType st = scalar_type_of<T>;
  auto in_st = [st](const Tensor& t) {   // t itself when it already is (no dispatcher call: the fp32/fp64 case)
    return t.scalar_type() == st && t.is_contiguous() ? t : contiguous(torch::stable::to(t, st));
  };
  ComputeWeights<T> w;
  w.Wc = in_st(Wc); w.bc = in_st(bc); w.bg = in_st(bg);
  w.WcT = contiguous(t2(w.Wc));
  if (!bf16_pairs) {
    w.Wg = in_st(Wg);
    w.WgT = generate ? contiguous(t2(w.Wg)) : empty({0}, st, Wc);
    return w;
  }
  w.Wg = w.WgT = empty({0}, st, Wc);  // unused on this path: the GEMMs read WgP and WgR
  if (generate) w.WgP = isa_avx512bf16_setup::pairs_along_columns(Wg);
  if (backward) w.WgR = isa_avx512bf16_setup::pairs_along_rows(Wg);
  if (all_dots) {
    w.WcP = isa_avx512bf16_setup::pairs_along_columns(Wc);
    if (backward) w.WcR = isa_avx512bf16_setup::pairs_along_rows(Wc);
  }
  return w;
}

template <class T> MixArgs<T> weight_args(const MixShape& sh, const ComputeWeights<T>& wt) {
  MixArgs<T> a;
  a.A = sh.A; a.B = sh.B; a.L = sh.L; a.C = sh.C; a.S = sh.S; a.d = sh.d;
  a.x = nullptr; a.xA = a.xB = a.xL = 0;
  a.dy = nullptr; a.dyA = a.dyB = a.dyL = 0;
  a.out = nullptr; a.oA = a.oB = a.oL = 0;
  a.Wc = data_of<T>(wt.Wc); a.WcT = data_of<T>(wt.WcT); a.bc = data_of<T>(wt.bc);
  a.Wg = data_of<T>(wt.Wg); a.WgT = data_of<T>(wt.WgT); a.bg = data_of<T>(wt.bg);
  auto packed = [](const Tensor& t, const uint32_t*& ptr, int64_t& ld) {
    if (!t.defined()) return;
    ptr = data_of<const uint32_t>(t);
    ld = t.size(1);
  };
  packed(wt.WgP, a.WgP, a.wgp_ld); packed(wt.WgR, a.WgR, a.wgr_ld);
  packed(wt.WcP, a.WcP, a.wcp_ld); packed(wt.WcR, a.WcR, a.wcr_ld);
  return a;
}

// A (A, B, L, C) tensor of 16-bit values staged as float32 rows for the sequences [n0, n1) of one block: `rows`
// holds them as (n1 - n0, L, C), contiguous.
template <class H> struct Staged {
  H* base;
  int64_t sA, sB, sL, B, L, C;
  Staged(const Tensor& t, int64_t B_, int64_t L_, int64_t C_)
      : base(data_of<H>(t)), sA(t.stride(0)), sB(t.stride(1)), sL(t.stride(2)), B(B_), L(L_), C(C_) {}
  H* row(int64_t n, int64_t l) const { return base + (n / B) * sA + (n % B) * sB + l * sL; }
  void widen(Isa isa, int64_t n0, int64_t n1, float* rows) const {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t l = 0; l < L; ++l) run_widen<H>(isa, row(n, l), rows + ((n - n0) * L + l) * C, C);
  }
  void narrow(Isa isa, int64_t n0, int64_t n1, const float* rows) const {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t l = 0; l < L; ++l) run_narrow<H>(isa, rows + ((n - n0) * L + l) * C, row(n, l), C);
  }
};

// Point a's x (or dy, or out) at block-local contiguous rows (1, n1 - n0, L, C) for sequences [0, n1 - n0).
template <class P, class R> void point_at_rows(P& p, int64_t& sA, int64_t& sB, int64_t& sL, R* rows, int64_t L,
                                              int64_t C) {
  p = rows; sA = 0; sB = L * C; sL = C;
}

// P[m][i][j] = E[m][i][j] * inv[m][j] for a block's M matrices, as the backward's softmax computes it.
template <class T> void keep_probabilities(const BlockBuffers<T>& w, int64_t M, int64_t L, T* probs) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < L; ++i) {
      const T* e = w.g + (m * L + i) * L;
      const T* inv = w.inv + m * L;
      T* p = probs + (m * L + i) * L;
      for (int64_t j = 0; j < L; ++j) p[j] = e[j] * inv[j];
    }
}

// probs: nullptr, or (N*S, L, L) in T to keep P in for the backward.
template <class H> void mix_forward_impl(Isa isa, const MixShape& sh, const Tensor& x, const Tensor& Wc,
                                         const Tensor& bc, const Tensor& Wg, const Tensor& bg,
                                         Tensor& y, typename ComputeOf<H>::type* probs) {
  using T = typename ComputeOf<H>::type;
  constexpr bool kStaged = !std::is_same_v<H, T>;
  const int64_t N = sh.sequences(), L = sh.L, C = sh.C;
  const bool dots = uses_bf16_dots<H>(isa), all_dots = all_products_on_dots<H>(isa, sh);
  const ComputeWeights<T> wt = compute_weights<T>(Wc, bc, Wg, bg, dots, all_dots, false, /*generate=*/true);
  MixArgs<T> a = weight_args<T>(sh, wt);
  if constexpr (!kStaged) {
    a.x = data_of<T>(x); a.xA = x.stride(0); a.xB = x.stride(1); a.xL = x.stride(2);
    a.out = data_of<T>(y); a.oA = y.stride(0); a.oB = y.stride(1); a.oL = y.stride(2);
  } else if (all_dots) {
    a.x16 = reinterpret_cast<const uint16_t*>(data_of<H>(x)); a.xA = x.stride(0); a.xB = x.stride(1); a.xL = x.stride(2);
  }
  const int64_t nb = block_size(N, sh.S, L, sizeof(T), kForwardMatrixBytes);
  const int64_t nblocks = (N + nb - 1) / nb;
  const BufferSizes<T> sizes = buffer_sizes<T>(nb, L, C, sh.S, sh.d, false, dots);
  const DotSizes dot_words = all_dots ? isa_avx512bf16_setup::dot_sizes(nb, L, C, sh.S, sh.d, false) : DotSizes{};
  const int64_t rows = kStaged && !all_dots ? nb * L * C : 0;  // one block's x or y as float32 rows
  const Staged<H> xs{x, sh.B, L, C}, ys{y, sh.B, L, C};
  torch::stable::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    BlockScratch<T> ws(sizes, dot_words, all_dots, rows, 2);
    const DotOperands& ops = ws.ops;
    BlockBuffers<T>& w = ws.w;
    T* const x_rows = ws.staged[0];
    T* const y_rows = ws.staged[1];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(N, (blk + 1) * nb);
      if (all_dots) {
        run_forward_block<T>(isa, a, n0, n1, w);
        if constexpr (kStaged) ys.narrow(isa, n0, n1, ops.rows);
      } else if constexpr (kStaged) {
        MixArgs<T> ab = a;
        xs.widen(isa, n0, n1, x_rows);
        point_at_rows(ab.x, ab.xA, ab.xB, ab.xL, x_rows, L, C);
        point_at_rows(ab.out, ab.oA, ab.oB, ab.oL, y_rows, L, C);
        ab.A = 1; ab.B = n1 - n0;
        run_forward_block<T>(isa, ab, 0, n1 - n0, w);
        ys.narrow(isa, n0, n1, y_rows);
      } else {
        run_forward_block<T>(isa, a, n0, n1, w);
      }
      if (probs) keep_probabilities(w, (n1 - n0) * sh.S, L, probs + n0 * sh.S * L * L);
    }
  });
}

// f(H{}) with H the C++ type of the kernels' storage types (float32, float64, bfloat16, float16).
template <class F> void on_storage_type(ScalarType st, const char* op, const F& f) {
  switch (st) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    case ScalarType::BFloat16: return f(c10::BFloat16{});
    case ScalarType::Half: return f(c10::Half{});
    default: fail('"', op, "\" not implemented for '", st, "'");
  }
}

// probs: null (the plain forward), or the kept-P output of dynamic_mix_keep_out.
void mix_forward_checked(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                         const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                         Tensor& y, Tensor* probs) {
  const MixShape sh = check_mix_contract(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                         num_segments);
  check_like(y, x, "y");
  if (probs) check_probs(*probs, sh, x);
  if (sh.sequences() == 0 || sh.L == 0 || sh.C == 0) return;
  const Isa isa = chosen_isa();
  const char* op = probs ? "dynamixer_ops_C::dynamic_mix_keep_out (cpu)" : "dynamixer_ops_C::dynamic_mix_out (cpu)";
  on_storage_type(x.scalar_type(), op, [&](auto storage) {
    using scalar_t = decltype(storage);
    using T = typename ComputeOf<scalar_t>::type;
    mix_forward_impl<scalar_t>(isa, sh, x, compress_weight, compress_bias, generate_weight, generate_bias, y,
                               probs ? data_of<T>(*probs) : nullptr);
  });
}

void dynamic_mix_out_cpu(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                         const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                         Tensor& y) {
  mix_forward_checked(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, y, nullptr);
}

void dynamic_mix_keep_out_cpu(const Tensor& x, const Tensor& compress_weight, const Tensor& compress_bias,
                              const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                              Tensor& y, Tensor& probs) {
  mix_forward_checked(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, y, &probs);
}

template <class H> void mix_backward_impl(Isa isa, const MixShape& sh, const Tensor& grad_y, const Tensor& x,
                                          const Tensor& Wc, const Tensor& bc, const Tensor& Wg,
                                          const Tensor& bg, Tensor& grad_x, Tensor& grad_Wc,
                                          Tensor& grad_bc, Tensor& grad_Wg, Tensor& grad_bg,
                                          const typename ComputeOf<H>::type* probs) {
  using T = typename ComputeOf<H>::type;
  constexpr bool kStaged = !std::is_same_v<H, T>;
  const int64_t N = sh.sequences(), L = sh.L, C = sh.C, S = sh.S, d = sh.d;
  const int64_t Sd = S * d, Ld = L * d, LL = L * L;
  const bool dots = uses_bf16_dots<H>(isa), all_dots = all_products_on_dots<H>(isa, sh);
  const ComputeWeights<T> wt = compute_weights<T>(Wc, bc, Wg, bg, dots, all_dots, true, /*generate=*/!probs);
  MixArgs<T> a = weight_args<T>(sh, wt);
  if constexpr (!kStaged) {
    a.x = data_of<T>(x); a.xA = x.stride(0); a.xB = x.stride(1); a.xL = x.stride(2);
    a.dy = data_of<T>(grad_y); a.dyA = grad_y.stride(0); a.dyB = grad_y.stride(1); a.dyL = grad_y.stride(2);
    a.out = data_of<T>(grad_x); a.oA = grad_x.stride(0); a.oB = grad_x.stride(1); a.oL = grad_x.stride(2);
  } else if (all_dots) {
    a.x16 = reinterpret_cast<const uint16_t*>(data_of<H>(x)); a.xA = x.stride(0); a.xB = x.stride(1); a.xL = x.stride(2);
    a.dy16 = reinterpret_cast<const uint16_t*>(data_of<H>(grad_y));
    a.dyA = grad_y.stride(0); a.dyB = grad_y.stride(1); a.dyL = grad_y.stride(2);
  }
  const int64_t nb = std::min(block_size(N, S, L, sizeof(T), kBackwardMatrixBytes), kMaxSumSequences);
  const int64_t nblocks = (N + nb - 1) / nb;
  const int64_t part_size = LL * Ld + LL + Sd * C + Sd;
  const int64_t by_memory = std::max(kMinChunks, kPartialBytes / (part_size * static_cast<int64_t>(sizeof(T))));
  const int64_t nchunks = std::min({nblocks, kMaxChunks, by_memory});
  // Each chunk sums its blocks' weight gradients in a T partial. A chunk deeper than kMaxSumSequences (large N)
  // also gets a float64 spill: its T partial is added there and restarted every kMaxSumSequences or more
  // sequences, so no T accumulator runs deeper than about that many sequences and the weight gradients'
  // error does not grow with N. Whether chunks spill is fixed by the shape; small batches pay nothing.
  const int64_t blocks_per_chunk_max = (nblocks + nchunks - 1) / nchunks;
  const bool spill = blocks_per_chunk_max * nb > kMaxSumSequences;
  Tensor partials = zeros({nchunks, part_size}, scalar_type_of<T>, x);
  Tensor spills = spill ? zeros({nchunks, part_size}, ScalarType::Double, x) : Tensor();
  T* part_base = data_of<T>(partials);
  double* spill_base = spill ? data_of<double>(spills) : nullptr;
  const BufferSizes<T> sizes = buffer_sizes<T>(nb, L, C, S, d, true, dots);
  const DotSizes dot_words = all_dots ? isa_avx512bf16_setup::dot_sizes(nb, L, C, S, d, true) : DotSizes{};
  const int64_t rows = kStaged && !all_dots ? nb * L * C : 0;  // one block's x, dy or grad_x as float32 rows
  const Staged<H> xs{x, sh.B, L, C}, dys{grad_y, sh.B, L, C}, gxs{grad_x, sh.B, L, C};
  torch::stable::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    BlockScratch<T> ws(sizes, dot_words, all_dots, rows, 3);
    const DotOperands& ops = ws.ops;
    BlockBuffers<T>& w = ws.w;
    T* const x_rows = ws.staged[0];
    T* const dy_rows = ws.staged[1];
    T* const gx_rows = ws.staged[2];
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* pb = part_base + chunk * part_size;
      const Partials<T> p{pb, pb + LL * Ld, pb + LL * Ld + LL, pb + LL * Ld + LL + Sd * C};
      int64_t depth = 0;    // sequences summed into pb since it was last spilled
      // Chunk c owns blocks [c*nblocks/nchunks, (c+1)*nblocks/nchunks): balanced, fixed by the shape.
      const int64_t first = chunk * nblocks / nchunks, last = (chunk + 1) * nblocks / nchunks;
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t n0 = blk * nb, n1 = std::min(N, (blk + 1) * nb);
        MixArgs<T> ab = a;
        ab.probs = probs ? probs + n0 * S * LL : nullptr;
        if (all_dots) {
          run_backward_block<T>(isa, ab, n0, n1, w, p);
          if constexpr (kStaged) gxs.narrow(isa, n0, n1, ops.rows);
        } else if constexpr (kStaged) {
          xs.widen(isa, n0, n1, x_rows);
          dys.widen(isa, n0, n1, dy_rows);
          point_at_rows(ab.x, ab.xA, ab.xB, ab.xL, x_rows, L, C);
          point_at_rows(ab.dy, ab.dyA, ab.dyB, ab.dyL, dy_rows, L, C);
          point_at_rows(ab.out, ab.oA, ab.oB, ab.oL, gx_rows, L, C);
          ab.A = 1; ab.B = n1 - n0;
          run_backward_block<T>(isa, ab, 0, n1 - n0, w, p);
          gxs.narrow(isa, n0, n1, gx_rows);
        } else {
          run_backward_block<T>(isa, ab, n0, n1, w, p);
        }
        depth += n1 - n0;
        if (spill && depth >= kMaxSumSequences && blk + 1 < last) {
          double* sp = spill_base + chunk * part_size;
          for (int64_t e = 0; e < part_size; ++e) sp[e] += static_cast<double>(pb[e]);
          std::fill(pb, pb + part_size, T(0));
          depth = 0;
        }
      }
    }
  });
  // Sum the chunks' partials (and spills) in chunk order, in float64. The bf16-dot path keeps dWg transposed.
  const std::pair<H*, int64_t> dst[] = {
      {data_of<H>(grad_Wg), LL * Ld}, {data_of<H>(grad_bg), LL},
      {data_of<H>(grad_Wc), Sd * C}, {data_of<H>(grad_bc), Sd}};
  int64_t offset = 0;
  for (const auto& [out, count] : dst) {
    const T* src = part_base + offset;
    const double* spilled = spill ? spill_base + offset : nullptr;
    // On the bf16-dot path the dWg partials are dWg^T: summed into a (Ld, LL) buffer, then transposed by ATen's
    // blocked copy (element-wise scattered stores took ~5% of the backward at DynaMixer-L stage 1).
    const bool transposed = dots && out == dst[0].first;
    Tensor transposed_sum = transposed ? empty({Ld, LL}, grad_Wg.scalar_type(), grad_Wg) : Tensor();
    H* sum = transposed ? data_of<H>(transposed_sum) : out;
    torch::stable::parallel_for(0, count, 8192, [&](int64_t e0, int64_t e1) {
      // Chunk-major over slices of elements: streaming each chunk's partial (chunks are part_size apart) in
      // vectorizable runs; every element still adds its chunks in chunk order.
      constexpr int64_t kSlice = 1024;
      double acc[kSlice];
      for (int64_t s0 = e0; s0 < e1; s0 += kSlice) {
        const int64_t n = std::min(kSlice, e1 - s0);
        std::fill(acc, acc + n, 0.0);
        for (int64_t c = 0; c < nchunks; ++c) {
          const T* part = src + c * part_size + s0;
          for (int64_t e = 0; e < n; ++e) acc[e] += static_cast<double>(part[e]);
          if (spilled) {
            const double* sp = spilled + c * part_size + s0;
            for (int64_t e = 0; e < n; ++e) acc[e] += sp[e];
          }
        }
        for (int64_t e = 0; e < n; ++e) sum[s0 + e] = static_cast<H>(static_cast<T>(acc[e]));
      }
    });
    if (transposed) torch::stable::copy_(grad_Wg, t2(transposed_sum));
    offset += count;
  }
}

// probs: undefined (recompute P), or the forward's kept P.
void mix_backward_checked(const Tensor& grad_y, const Tensor& x, const Tensor* probs,
                          const Tensor& compress_weight, const Tensor& compress_bias,
                          const Tensor& generate_weight, const Tensor& generate_bias, int64_t num_segments,
                          Tensor& grad_x, Tensor& grad_compress_weight, Tensor& grad_compress_bias,
                          Tensor& grad_generate_weight, Tensor& grad_generate_bias) {
  const MixShape sh = check_mix_contract(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                         num_segments);
  if (probs) check_probs(*probs, sh, x);
  check_like(grad_y, x, "grad_y");
  check_like(grad_x, x, "grad_x");
  const std::pair<Tensor*, const Tensor*> weight_grads[] = {
      {&grad_compress_weight, &compress_weight}, {&grad_compress_bias, &compress_bias},
      {&grad_generate_weight, &generate_weight}, {&grad_generate_bias, &generate_bias}};
  for (const auto& [g, w] : weight_grads) {
    DMX_CHECK(same_sizes(*g, *w) && g->is_contiguous() && g->scalar_type() == x.scalar_type() && same_device(*g, x),
              "dynamixer_ops: weight gradients must be contiguous, with their weight's shape ", shape_str(w->sizes()),
              " and x's dtype and device; got shape ", shape_str(g->sizes()));
  }
  if (sh.sequences() == 0 || sh.L == 0 || sh.C == 0) {
    for (const auto& gw : weight_grads) torch::stable::zero_(*gw.first);
    return;
  }
  const Isa isa = chosen_isa();
  const char* op = probs ? "dynamixer_ops_C::dynamic_mix_backward_kept_out (cpu)"
                          : "dynamixer_ops_C::dynamic_mix_backward_out (cpu)";
  on_storage_type(x.scalar_type(), op, [&](auto storage) {
    using scalar_t = decltype(storage);
    using T = typename ComputeOf<scalar_t>::type;
    mix_backward_impl<scalar_t>(isa, sh, grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias,
                                grad_x, grad_compress_weight, grad_compress_bias, grad_generate_weight,
                                grad_generate_bias, probs ? data_of<T>(*probs) : nullptr);
  });
}

void dynamic_mix_backward_out_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& compress_weight,
                                  const Tensor& compress_bias, const Tensor& generate_weight,
                                  const Tensor& generate_bias, int64_t num_segments, Tensor& grad_x,
                                  Tensor& grad_compress_weight, Tensor& grad_compress_bias,
                                  Tensor& grad_generate_weight, Tensor& grad_generate_bias) {
  mix_backward_checked(grad_y, x, nullptr, compress_weight, compress_bias, generate_weight, generate_bias,
                       num_segments, grad_x, grad_compress_weight, grad_compress_bias, grad_generate_weight,
                       grad_generate_bias);
}

void dynamic_mix_backward_kept_out_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& probs,
                                       const Tensor& compress_weight, const Tensor& compress_bias,
                                       const Tensor& generate_weight, const Tensor& generate_bias,
                                       int64_t num_segments, Tensor& grad_x, Tensor& grad_compress_weight,
                                       Tensor& grad_compress_bias, Tensor& grad_generate_weight,
                                       Tensor& grad_generate_bias) {
  mix_backward_checked(grad_y, x, &probs, compress_weight, compress_bias, generate_weight, generate_bias,
                       num_segments, grad_x, grad_compress_weight, grad_compress_bias, grad_generate_weight,
                       grad_generate_bias);
}

}  // namespace
}  // namespace dynamixer_ops

STABLE_TORCH_LIBRARY_IMPL(dynamixer_ops_C, CPU, m) {
  m.impl("dynamic_mix_out",
         TORCH_BOX(static_cast<dynamixer_ops::DynamicMixOutFn*>(&dynamixer_ops::dynamic_mix_out_cpu)));
  m.impl("dynamic_mix_backward_out",
         TORCH_BOX(static_cast<dynamixer_ops::DynamicMixBackwardOutFn*>(
             &dynamixer_ops::dynamic_mix_backward_out_cpu)));
  m.impl("dynamic_mix_keep_out",
         TORCH_BOX(static_cast<dynamixer_ops::DynamicMixKeepOutFn*>(&dynamixer_ops::dynamic_mix_keep_out_cpu)));
  m.impl("dynamic_mix_backward_kept_out",
         TORCH_BOX(static_cast<dynamixer_ops::DynamicMixBackwardKeptOutFn*>(
             &dynamixer_ops::dynamic_mix_backward_kept_out_cpu)));
}
