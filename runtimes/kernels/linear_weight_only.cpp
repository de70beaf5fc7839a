// cpm_mobile::linear_q8x4.out / linear_q4x4.out: a linear layer over quantised weights with fp32
// activations (weight-only quantisation).
//
//   out[t, n] = sum_k x[t, k] * (code[n, k] * scale[n, k / 32])
//
// x [..., K] fp32 (K a multiple of 32); out [..., N] fp32; `packed` uint8 [ceil(N / 4), K / 32, bytes]:
// the weight in tiles of 4 output rows x 32 input columns, stored in the order the kernel reads them, so
// a decode step streams one contiguous buffer (4 rows read side by side from a row-major matrix are four
// streams: measured 9.6 against 19.5 GB/s out of cache on one core here). Each tile:
//   q8x4: 4 fp16 scales (one per row), then 4 x 32 int8 codes (row by row)      = 136 bytes
//         (llama.cpp Q8_0's 34 bytes per 32 weights: decode reads as many bytes as Q8_0's)
//   q4x4: 4 bf16 scales, then 4 x 16 bytes of signed 4-bit codes (row by row;   =  72 bytes
//         byte i holds code i in its low nibble and code i + 16 in its high one, llama.cpp's Q4_0 order)
// Rows past N in the last tile are zero codes and are never written out. exporter/kernels/ops.py packs
// and unpacks this layout and gives the op's eager form (the twin's).
//
// Why a kernel of ours: XNNPACK in ExecuTorch 1.5.1 runs quantised linears only with int8 activations
// (dynamic per token), whose rounding costs several times llama.cpp Q8_0's KL on real models; its
// partitioner has no weight-only path, and the portable fallback dequantises the whole weight on every
// call. Here each code is decoded to fp32 (code x scale, the dequantised weight an eager reference
// multiplies by) inside the dot product:
// - one token (decode): four rows' dot products straight from the tile stream;
// - several tokens (prefill): 16 rows decoded once per call into a transposed scratch [K][16] in L2,
//   then 6 tokens x 16 rows per register tile (outer products: one weight load per 6 multiply-adds).
// Output rows are split over ExecuTorch's threadpool (the one XNNPACK runs on).
//
// Portable SIMD through GCC/Clang vector extensions; intrinsics only for widening 8-bit codes to 32-bit
// lanes, which GCC 12 otherwise emits one lane at a time.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace cpm_mobile {
namespace native {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

constexpr int64_t kTileRows = 4;
constexpr int64_t kBlock = 32;      // input columns per scale
constexpr int64_t kGroupRows = 16;  // rows per prefill register tile (4 tiles)
constexpr int64_t kTokens = 6;      // tokens per prefill register tile

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }
inline float sum16(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// 16 bytes -> 16 x int32, sign- or zero-extended.
template <bool Signed>
inline i32x16 widen16(const void* p) {
#if defined(__AVX512F__)
  __m128i bytes;
  std::memcpy(&bytes, p, sizeof bytes);
  const __m512i v = Signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
  return reinterpret_cast<i32x16>(v);
#elif defined(__AVX2__)
  __m128i bytes;
  std::memcpy(&bytes, p, sizeof bytes);
  const __m256i lo = Signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
  const __m128i upper = _mm_srli_si128(bytes, 8);
  const __m256i hi = Signed ? _mm256_cvtepi8_epi32(upper) : _mm256_cvtepu8_epi32(upper);
  i32x16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#elif defined(__ARM_NEON)
  int32x4_t parts[4];
  if (Signed) {
    int8x16_t bytes;
    std::memcpy(&bytes, p, sizeof bytes);
    const int16x8_t lo = vmovl_s8(vget_low_s8(bytes)), hi = vmovl_s8(vget_high_s8(bytes));
    parts[0] = vmovl_s16(vget_low_s16(lo)), parts[1] = vmovl_s16(vget_high_s16(lo));
    parts[2] = vmovl_s16(vget_low_s16(hi)), parts[3] = vmovl_s16(vget_high_s16(hi));
  } else {
    uint8x16_t bytes;
    std::memcpy(&bytes, p, sizeof bytes);
    const uint16x8_t lo = vmovl_u8(vget_low_u8(bytes)), hi = vmovl_u8(vget_high_u8(bytes));
    parts[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo)));
    parts[1] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(lo)));
    parts[2] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi)));
    parts[3] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(hi)));
  }
  i32x16 v;
  std::memcpy(&v, parts, sizeof v);
  return v;
#else
  i32x16 v;
  for (int i = 0; i < 16; ++i) {
    v[i] = Signed ? static_cast<int32_t>(static_cast<const int8_t*>(p)[i])
                  : static_cast<int32_t>(static_cast<const uint8_t*>(p)[i]);
  }
  return v;
#endif
}

inline f32x16 to_f32(i32x16 v) { return __builtin_convertvector(v, f32x16); }

// IEEE half -> float, subnormals included (4 per tile of 128 codes: no need for F16C).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa x 2^-24
    std::memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline float bf16_to_float(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Each format: the bytes of a tile, its 4 scales, and the 32 codes of row r as two runs of 16 floats.
struct Q8x4 {
  static constexpr int64_t kTileBytes = 8 + kTileRows * kBlock;
  static void scales(const uint8_t* tile, float s[4]) {
    uint16_t raw[4];
    std::memcpy(raw, tile, 8);
    for (int r = 0; r < 4; ++r) s[r] = half_to_float(raw[r]);
  }
  static void codes(const uint8_t* tile, int r, f32x16& lo, f32x16& hi) {
    const uint8_t* c = tile + 8 + r * kBlock;
    lo = to_f32(widen16<true>(c));
    hi = to_f32(widen16<true>(c + 16));
  }
};

struct Q4x4 {
  static constexpr int64_t kTileBytes = 8 + kTileRows * kBlock / 2;
  static void scales(const uint8_t* tile, float s[4]) {
    uint16_t raw[4];
    std::memcpy(raw, tile, 8);
    for (int r = 0; r < 4; ++r) s[r] = bf16_to_float(raw[r]);
  }
  static void codes(const uint8_t* tile, int r, f32x16& lo, f32x16& hi) {
    const i32x16 bytes = widen16<false>(tile + 8 + r * (kBlock / 2));
    lo = to_f32((bytes << 28) >> 28);  // the low nibble, sign-extended
    hi = to_f32((bytes << 24) >> 28);  // the high nibble, sign-extended
  }
};

struct Problem {
  const float* x;
  const uint8_t* packed;
  int64_t tokens, in, outs, blocks;
  float* out;
};

// One token, rows of tiles [first, last).
template <typename Format>
void decode_step(const Problem& p, int64_t first, int64_t last) {
  for (int64_t tile = first; tile < last; ++tile) {
    const uint8_t* t = p.packed + tile * p.blocks * Format::kTileBytes;
    f32x16 acc[4] = {};
    for (int64_t b = 0; b < p.blocks; ++b, t += Format::kTileBytes) {
      const f32x16 x0 = load16(p.x + b * kBlock), x1 = load16(p.x + b * kBlock + 16);
      float s[4];
      Format::scales(t, s);
      for (int r = 0; r < 4; ++r) {
        f32x16 lo, hi;
        Format::codes(t, r, lo, hi);
        acc[r] += (lo * x0 + hi * x1) * s[r];
      }
    }
    const int64_t rows = std::min(kTileRows, p.outs - tile * kTileRows);
    for (int r = 0; r < rows; ++r) p.out[tile * kTileRows + r] = sum16(acc[r]);
  }
}

// Every token, rows of 16-row groups [first, last).
template <typename Format>
void prefill(const Problem& p, int64_t first, int64_t last) {
  const int64_t in = p.in, tiles = (p.outs + kTileRows - 1) / kTileRows;
  std::vector<float> wt(static_cast<size_t>(in * kGroupRows));  // [K][16]: column k of the group's rows
  for (int64_t group = first; group < last; ++group) {
    std::fill(wt.begin(), wt.end(), 0.f);
    for (int64_t q = 0; q < kGroupRows / kTileRows && group * 4 + q < tiles; ++q) {
      const uint8_t* t = p.packed + (group * 4 + q) * p.blocks * Format::kTileBytes;
      for (int64_t b = 0; b < p.blocks; ++b, t += Format::kTileBytes) {
        float s[4];
        Format::scales(t, s);
        for (int r = 0; r < 4; ++r) {
          f32x16 lo, hi;
          Format::codes(t, r, lo, hi);
          lo *= s[r], hi *= s[r];
          float* column = wt.data() + b * kBlock * kGroupRows + q * kTileRows + r;
          for (int i = 0; i < 16; ++i) column[i * kGroupRows] = lo[i], column[(i + 16) * kGroupRows] = hi[i];
        }
      }
    }
    const int64_t n = group * kGroupRows, rows = std::min(kGroupRows, p.outs - n);
    auto store = [&](int64_t t, f32x16 v) {
      if (rows == kGroupRows) {
        store16(p.out + t * p.outs + n, v);
      } else {
        for (int64_t r = 0; r < rows; ++r) p.out[t * p.outs + n + r] = v[r];
      }
    };
    int64_t t = 0;
    for (; t + kTokens <= p.tokens; t += kTokens) {
      const float* x = p.x + t * in;
      f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {};
      for (int64_t k = 0; k < in; ++k) {
        const f32x16 w = load16(wt.data() + k * kGroupRows);
        a0 += x[k] * w, a1 += x[in + k] * w, a2 += x[2 * in + k] * w;
        a3 += x[3 * in + k] * w, a4 += x[4 * in + k] * w, a5 += x[5 * in + k] * w;
      }
      store(t, a0), store(t + 1, a1), store(t + 2, a2), store(t + 3, a3), store(t + 4, a4), store(t + 5, a5);
    }
    for (; t < p.tokens; ++t) {
      const float* x = p.x + t * in;
      f32x16 a = {};
      for (int64_t k = 0; k < in; ++k) a += x[k] * load16(wt.data() + k * kGroupRows);
      store(t, a);
    }
  }
}

template <typename Format>
bool run(const Problem& p) {
  const int64_t tiles = (p.outs + kTileRows - 1) / kTileRows;
  if (p.tokens == 1) {
    // One contiguous run of tiles per thread: each thread streams its own part of the buffer (chunks
    // dealt out in turn measured 18.5 against 37 GB/s out of cache here).
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(executorch::extension::get_thread_count(), tiles / 16));
    return executorch::extension::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) decode_step<Format>(p, tiles * s / threads, tiles * (s + 1) / threads);
    });
  }
  const int64_t groups = (tiles + 3) / 4;
  return executorch::extension::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    prefill<Format>(p, begin, end);
  });
}

template <typename Format>
Tensor& linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed, int64_t outs, Tensor& out,
                   const char* op) {
  const bool shapes = x.dim() >= 1 && x.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float &&
                      packed.scalar_type() == ScalarType::Byte && packed.dim() == 3 && outs > 0 &&
                      packed.size(0) == (outs + kTileRows - 1) / kTileRows && packed.size(2) == Format::kTileBytes &&
                      x.size(x.dim() - 1) == packed.size(1) * kBlock;
  if (!shapes) {
    ET_LOG(Error, "%s: x [..., K] fp32 and packed uint8 [ceil(N / 4), K / 32, %d] expected", op,
           static_cast<int>(Format::kTileBytes));
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  executorch::aten::SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (int64_t d = 0; d < x.dim(); ++d) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(outs);
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) == Error::Ok,
                      InvalidArgument, out, "%s: cannot resize out", op);
  const int64_t in = x.size(x.dim() - 1);
  const Problem p{x.const_data_ptr<float>(), packed.const_data_ptr<uint8_t>(), in == 0 ? 0 : x.numel() / in, in, outs,
                  in / kBlock, out.mutable_data_ptr<float>()};
  if (p.tokens == 0) return out;
  ET_KERNEL_CHECK_MSG(ctx, run<Format>(p), Internal, out, "%s: parallel_for failed", op);
  return out;
}

}  // namespace

Tensor& linear_q8x4_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed, int64_t out_features,
                        Tensor& out) {
  return linear_out<Q8x4>(ctx, x, packed, out_features, out, "linear_q8x4");
}

Tensor& linear_q4x4_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed, int64_t out_features,
                        Tensor& out) {
  return linear_out<Q4x4>(ctx, x, packed, out_features, out, "linear_q4x4");
}

}  // namespace native
}  // namespace cpm_mobile

EXECUTORCH_LIBRARY(cpm_mobile, "linear_q8x4.out", cpm_mobile::native::linear_q8x4_out);
EXECUTORCH_LIBRARY(cpm_mobile, "linear_q4x4.out", cpm_mobile::native::linear_q4x4_out);
