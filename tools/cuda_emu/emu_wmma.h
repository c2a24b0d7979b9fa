// nvcuda::wmma for the CPU emulator (included by emu.h; what it models is described there).
#pragma once

namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision {
struct tf32;
}
enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: round to the nearest tf32 (10 mantissa bits), ties away from zero, kept in an fp32.
inline float __float_to_tf32(float in) {
  if (!std::isfinite(in)) return in;
  uint32_t bits;
  std::memcpy(&bits, &in, 4);
  bits = (bits + 0x1000u) & ~0x1fffu;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

namespace detail {

inline float tf32_truncate(float v) {   // what the tensor cores read of an fp32 register: its top 19 bits
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= ~0x1fffu;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

template <typename T> struct Storage { using type = T; };
template <> struct Storage<precision::tf32> { using type = float; };

template <typename T> inline float to_float(T v) { return static_cast<float>(v); }
template <> inline float to_float<__half>(__half v) { return __half2float(v); }
template <> inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rows and columns of the tile a fragment holds, and num_elements per lane as <mma.h> declares them.
template <typename Use, int M, int N, int K, typename T> struct Shape;
template <int M, int N, int K, typename T> struct Shape<matrix_a, M, N, K, T> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K, typename T> struct Shape<matrix_b, M, N, K, T> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K, typename T> struct Shape<accumulator, M, N, K, T> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T> struct Count;
template <typename Use> struct Count<Use, 16, 16, 16, __half> {
  static_assert(!std::is_same_v<Use, accumulator>, "the emulator has only fp32 accumulators");
  static constexpr int value = 16;                          // each element held by two lanes
};
template <typename Use> struct Count<Use, 16, 16, 16, __nv_bfloat16> {
  static_assert(!std::is_same_v<Use, accumulator>, "bf16 accumulators do not exist");
  static constexpr int value = 8;
};
template <typename Use> struct Count<Use, 16, 16, 8, precision::tf32> {
  static_assert(!std::is_same_v<Use, accumulator>, "tf32 accumulators do not exist (use float)");
  static constexpr int value = 4;
};
template <> struct Count<accumulator, 16, 16, 16, float> { static constexpr int value = 8; };
template <> struct Count<accumulator, 16, 16, 8, float> { static constexpr int value = 8; };

// Slot (lane, e) of a fragment type holds tile element map[lane * num_elements + e] % (rows * cols):
// a fixed pseudo-random permutation, seeded by the type, so no lane's mapping follows a pattern.
template <typename Frag>
const std::vector<int>& slot_map() {
  static const std::vector<int> map = [] {
    std::vector<int> m(32 * Frag::num_elements);
    for (size_t i = 0; i < m.size(); ++i) m[i] = static_cast<int>(i);
    std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>{}(typeid(Frag).name())));
    std::shuffle(m.begin(), m.end(), rng);
    for (int& v : m) v %= Frag::rows * Frag::cols;
    return m;
  }();
  return map;
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  using element_type = T;
  using storage_element_type = typename detail::Storage<T>::type;
  using use = Use;
  using layout = Layout;
  static constexpr int m = M, n = N, k = K;
  static constexpr int rows = detail::Shape<Use, M, N, K, T>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K, T>::cols;
  static constexpr int num_elements = detail::Count<Use, M, N, K, T>::value;
  storage_element_type x[num_elements];
};

namespace detail {

template <typename Frag>
std::string name(const char* function) {
  return std::string("wmma::") + function + "<" + typeid(Frag).name() + ">";
}

inline void check_pointer(const void* p, unsigned ldm, size_t element_bytes, const char* function) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    std::ostringstream out;
    out << "wmma::" << function << ": pointer " << p << " is not 32-byte (256-bit) aligned";
    throw std::invalid_argument(out.str());
  }
  if ((ldm * element_bytes) % 16 != 0) {
    std::ostringstream out;
    out << "wmma::" << function << ": ldm " << ldm << " is not a multiple of 16 bytes (" << 16 / element_bytes
        << " elements)";
    throw std::invalid_argument(out.str());
  }
}

// One lane's part of a warp-collective call: `args` are this lane's operands, `run` does the call for all lanes;
// ptr, ldm and extra must be alike in every lane.
template <typename Args>
void collective(std::string what, const void* ptr, uint64_t ldm, uint64_t extra, Args* args,
                void (*run)(void* const*)) {
  emu::WarpCall call;
  call.what = std::move(what);
  call.ptr = ptr;
  call.ldm = ldm;
  call.extra = extra;
  call.lane = args;
  call.run = run;
  emu::current->block->warp_collective(std::move(call));
}

// Element (r, c) of the tile at p: row-major reads p[r * ldm + c], column-major p[c * ldm + r].
inline size_t offset(int r, int c, unsigned ldm, bool row_major_layout) {
  return row_major_layout ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r;
}

template <typename Frag>
struct LoadArgs { Frag* frag; const typename Frag::storage_element_type* p; unsigned ldm; bool row; };

template <typename Frag>
void run_load(void* const* lanes) {
  const std::vector<int>& map = slot_map<Frag>();
  for (int l = 0; l < 32; ++l) {
    auto* a = static_cast<LoadArgs<Frag>*>(lanes[l]);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int pos = map[l * Frag::num_elements + e];
      a->frag->x[e] = a->p[offset(pos / Frag::cols, pos % Frag::cols, a->ldm, a->row)];
    }
  }
}

template <typename Frag>
void load(Frag& f, const typename Frag::storage_element_type* p, unsigned ldm, bool row_major_layout) {
  check_pointer(p, ldm, sizeof(*p), "load_matrix_sync");
  LoadArgs<Frag> args{&f, p, ldm, row_major_layout};
  collective(name<Frag>("load_matrix_sync"), p, ldm, row_major_layout, &args, run_load<Frag>);
}

// The whole tile of a warp's fragments, as floats; where two slots hold one element they must agree.
template <typename Frag>
std::vector<float> gather(void* const* lanes, Frag* (*pick)(void*), const char* operand) {
  const std::vector<int>& map = slot_map<Frag>();
  std::vector<float> tile(Frag::rows * Frag::cols);
  std::vector<char> seen(tile.size(), 0);
  for (int l = 0; l < 32; ++l) {
    const Frag* f = pick(lanes[l]);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int pos = map[l * Frag::num_elements + e];
      const float v = to_float(f->x[e]);
      if (seen[pos] && std::memcmp(&tile[pos], &v, 4) != 0) {
        std::ostringstream out;
        out << "wmma::mma_sync: the two lanes' copies of element (" << pos / Frag::cols << ", " << pos % Frag::cols
            << ") of " << operand << " differ (" << tile[pos] << " and " << v
            << "): an element-wise write that assumed a fragment mapping";
        throw std::logic_error(out.str());
      }
      tile[pos] = v;
      seen[pos] = 1;
    }
  }
  return tile;
}

template <typename D, typename A, typename B, typename C>
struct MmaArgs { D* d; const A* a; const B* b; const C* c; };

template <typename D, typename A, typename B, typename C>
void run_mma(void* const* lanes) {
  using Args = MmaArgs<D, A, B, C>;
  constexpr bool tf32 = std::is_same_v<typename A::element_type, precision::tf32>;
  std::vector<float> a = gather<A>(lanes, +[](void* p) { return const_cast<A*>(static_cast<Args*>(p)->a); },
                                   "matrix_a");
  std::vector<float> b = gather<B>(lanes, +[](void* p) { return const_cast<B*>(static_cast<Args*>(p)->b); },
                                   "matrix_b");
  std::vector<float> c = gather<C>(lanes, +[](void* p) { return const_cast<C*>(static_cast<Args*>(p)->c); },
                                   "accumulator");
  if (tf32) {
    for (float& v : a) v = tf32_truncate(v);
    for (float& v : b) v = tf32_truncate(v);
  }
  constexpr int M = A::rows, K = A::cols, N = B::cols;
  std::vector<float> d(M * N);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c[i * N + j];
      for (int k = 0; k < K; ++k) acc += a[i * K + k] * b[k * N + j];
      d[i * N + j] = acc;
    }
  const std::vector<int>& map = slot_map<D>();
  for (int l = 0; l < 32; ++l) {
    D* out = static_cast<Args*>(lanes[l])->d;
    for (int e = 0; e < D::num_elements; ++e) out->x[e] = d[map[l * D::num_elements + e]];
  }
}

template <typename Frag>
struct StoreArgs { const Frag* frag; float* p; unsigned ldm; bool row; };

template <typename Frag>
void run_store(void* const* lanes) {
  const std::vector<int>& map = slot_map<Frag>();
  for (int l = 0; l < 32; ++l) {
    auto* a = static_cast<StoreArgs<Frag>*>(lanes[l]);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int pos = map[l * Frag::num_elements + e];
      a->p[offset(pos / Frag::cols, pos % Frag::cols, a->ldm, a->row)] = a->frag->x[e];
    }
  }
}

template <typename Frag>
struct FillArgs { Frag* frag; float v; };

template <typename Frag>
void run_fill(void* const* lanes) {
  for (int l = 0; l < 32; ++l) {
    auto* a = static_cast<FillArgs<Frag>*>(lanes[l]);
    for (int e = 0; e < Frag::num_elements; ++e) a->frag->x[e] = a->v;
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& a,
                      const typename fragment<Use, M, N, K, T, Layout>::storage_element_type* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator's load_matrix_sync takes a layout_t");
  detail::load(a, p, ldm, std::is_same_v<Layout, row_major>);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& a, const float* p, unsigned ldm, layout_t layout) {
  detail::load(a, p, ldm, layout == mem_row_major);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& a, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, float>;
  detail::check_pointer(p, ldm, sizeof(float), "store_matrix_sync");
  detail::StoreArgs<Frag> args{&a, p, ldm, layout == mem_row_major};
  detail::collective(detail::name<Frag>("store_matrix_sync"), p, ldm, layout, &args, detail::run_store<Frag>);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  detail::FillArgs<Frag> args{&f, v};
  uint32_t bits;                          // one value for the warp: the mapping is unspecified
  std::memcpy(&bits, &v, 4);
  detail::collective(detail::name<Frag>("fill_fragment"), nullptr, 0, bits, &args, detail::run_fill<Frag>);
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  using D = fragment<accumulator, M, N, K, float>;
  using A = fragment<matrix_a, M, N, K, T, LA>;
  using B = fragment<matrix_b, M, N, K, T, LB>;
  detail::MmaArgs<D, A, B, D> args{&d, &a, &b, &c};
  detail::collective(detail::name<A>("mma_sync") + "x" + typeid(B).name(), nullptr, 0, 0, &args,
                     detail::run_mma<D, A, B, D>);
}

}  // namespace wmma
}  // namespace nvcuda
