// cpm_mobile::sparse_expert_ffn.out: BlockFFN's expert FFN computing only the active experts.
//
//   out[t] = sum over experts e with scores[t, e] != 0, over units j of e:
//            SiLU(x[t] . up[e*de + j]) * scores[t, e] * down[e*de + j]
//
// x [N, H], scores [N, E] (the router's ReLU+RMSNorm output: exact zeros for idle experts),
// up [E*de, H] (the dense up projection's own weight), down [E*de, H] (the dense down projection
// transposed once at export time, so each unit's down column is one contiguous row).
// An expert's up rows and down rows are read in place, only when some token of the call uses it,
// and only for the tokens that use it. The active experts are split into contiguous slices, one
// per thread of ExecuTorch's threadpool (the one XNNPACK runs on); each slice accumulates into its
// own [N, H] buffer and the buffers are summed at the end (one synchronisation per call).
//
// The quantised overloads take the same computation over int8 / int4 codes of the same weights
// (cpm_mobile::sparse_expert_ffn_int8.out, cpm_mobile::sparse_expert_ffn_int4.out, layouts at
// Int8Weights / Int4Weights): each active unit's rows are decoded to fp32 once per call, and the
// activations stay fp32 (no activation quantisation, unlike XNNPACK's dynamic int8 linears).
//
// Plain C++ written for the compiler's auto-vectoriser (fixed-width inner loops with independent
// accumulators): no intrinsics, so the same source builds for x86 and ARM (NEON).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
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

// The loops below are plain forms compilers vectorise: reductions the pragma allows to reassociate
// (-fopenmp-simd: no OpenMP runtime involved) and an axpy over restrict pointers.

// One token: four independent accumulators over the row's quarters, so consecutive
// multiply-adds do not wait on each other.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  const int64_t q = n / 4;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < q; ++k) {
    s0 += a[k] * b[k];
    s1 += a[k + q] * b[k + q];
    s2 += a[k + 2 * q] * b[k + 2 * q];
    s3 += a[k + 3 * q] * b[k + 3 * q];
  }
  for (int64_t k = 4 * q; k < n; ++k) s0 += a[k] * b[k];
  return (s0 + s1) + (s2 + s3);
}

// Four tokens against one weight row: each row element is loaded once.
inline void dot4(const float* __restrict w, const float* __restrict x0, const float* __restrict x1,
                 const float* __restrict x2, const float* __restrict x3, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < n; ++k) {
    const float v = w[k];
    s0 += v * x0[k];
    s1 += v * x1[k];
    s2 += v * x2[k];
    s3 += v * x3[k];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// The weights of one call, by format. Each gives a unit's up row and down row as fp32 [H]: the
// fp32 format in place, the quantised ones decoded into the caller's scratch row (code x scale,
// exactly the dequantised weight an eager reference multiplies by), once per unit and call, so
// every token using the unit reuses it from L1.
struct Fp32Weights {
  const float* up;
  const float* down;
  int64_t hidden;
  const float* up_row(int64_t unit, float*) const { return up + unit * hidden; }
  const float* down_row(int64_t unit, float*) const { return down + unit * hidden; }
};

// int8 codes [units, H]; up: one scale per row (unit), down: one per column (output channel h),
// as torchao's per-channel quantisation of the dense up [E*de, H] and down [H, E*de] weights.
struct Int8Weights {
  const int8_t* up;
  const float* up_scales;  // [units]
  const int8_t* down;
  const float* down_scales;  // [H]
  int64_t hidden;
  const float* up_row(int64_t unit, float* row) const {
    const int8_t* codes = up + unit * hidden;
    const float scale = up_scales[unit];
#pragma omp simd
    for (int64_t k = 0; k < hidden; ++k) row[k] = static_cast<float>(codes[k]) * scale;
    return row;
  }
  const float* down_row(int64_t unit, float* row) const {
    const int8_t* codes = down + unit * hidden;
#pragma omp simd
    for (int64_t k = 0; k < hidden; ++k) row[k] = static_cast<float>(codes[k]) * down_scales[k];
    return row;
  }
};

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bf16) {  // bf16 is the top half of an fp32
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Signed 4-bit codes, two per byte, each row in chunks of 32 codes: byte i of a chunk holds code i
// in its low nibble and code i + 16 in its high nibble (llama.cpp's Q4_0 order), so decoding reads
// 16 bytes and writes two contiguous runs of 16 floats. Scales (fp32 or bf16) per block of codes
// along the dense weight's input dim: up [units, H / up_group]; down [units / down_group, H].
template <typename Scale>
struct Int4Weights {
  const uint8_t* up;
  const Scale* up_scales;
  const uint8_t* down;
  const Scale* down_scales;
  int64_t hidden, up_group, down_group;

  static void decode(const uint8_t* packed, int64_t hidden, float* row) {
    for (int64_t c = 0; c < hidden; c += 32) {
      const uint8_t* bytes = packed + c / 2;
#pragma omp simd
      for (int i = 0; i < 16; ++i) {
        row[c + i] = static_cast<float>(static_cast<int8_t>(bytes[i] << 4) >> 4);
        row[c + 16 + i] = static_cast<float>(static_cast<int8_t>(bytes[i]) >> 4);
      }
    }
  }
  const float* up_row(int64_t unit, float* row) const {
    decode(up + unit * (hidden / 2), hidden, row);
    const Scale* scales = up_scales + unit * (hidden / up_group);
    for (int64_t b = 0; b < hidden / up_group; ++b) {
      const float scale = to_float(scales[b]);
      float* block = row + b * up_group;
#pragma omp simd
      for (int64_t k = 0; k < up_group; ++k) block[k] *= scale;
    }
    return row;
  }
  const float* down_row(int64_t unit, float* row) const {
    decode(down + unit * (hidden / 2), hidden, row);
    const Scale* scales = down_scales + (unit / down_group) * hidden;
#pragma omp simd
    for (int64_t k = 0; k < hidden; ++k) row[k] *= to_float(scales[k]);
    return row;
  }
};

struct Problem {
  const float* x;
  const float* scores;
  int64_t tokens, hidden, experts, width;
  // For each active expert (ascending id): its id and the tokens that use it.
  std::vector<int64_t> active;
  std::vector<std::vector<int64_t>> users;
};

// Accumulates the experts active[first, last) into y [N, H] (zeroed by the caller). Each weight
// row is read from memory once per call; the other tokens using it find it in L1.
template <typename Weights>
void run_slice(const Problem& p, const Weights& w, size_t first, size_t last, float* y) {
  std::vector<float> scratch(static_cast<size_t>(2 * p.hidden));
  for (size_t a = first; a < last; ++a) {
    const int64_t e = p.active[a];
    for (int64_t j = 0; j < p.width; ++j) {
      const int64_t unit = e * p.width + j;
      const float* up_row = w.up_row(unit, scratch.data());
      const float* down_row = w.down_row(unit, scratch.data() + p.hidden);
      const std::vector<int64_t>& users = p.users[a];
      size_t u = 0;
      float dots[4];
      for (; u + 4 <= users.size(); u += 4) {
        const float* x = p.x;
        const int64_t h = p.hidden;
        dot4(up_row, x + users[u] * h, x + users[u + 1] * h, x + users[u + 2] * h, x + users[u + 3] * h, h, dots);
        for (int b = 0; b < 4; ++b) {
          const int64_t t = users[u + b];
          axpy(silu(dots[b]) * p.scores[t * p.experts + e], down_row, y + t * h, h);
        }
      }
      for (; u < users.size(); ++u) {
        const int64_t t = users[u];
        const float h = silu(dot(up_row, p.x + t * p.hidden, p.hidden)) * p.scores[t * p.experts + e];
        axpy(h, down_row, y + t * p.hidden, p.hidden);
      }
    }
  }
}

// The active experts of x / scores (shapes checked by the caller), split over ExecuTorch's
// threadpool: contiguous slices of about equal work, one per thread; slice 0 accumulates into out.
template <typename Weights>
bool run(const Tensor& x, const Tensor& scores, int64_t units, const Weights& w, Tensor& out) {
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = scores.size(1);
  Problem p{x.const_data_ptr<float>(), scores.const_data_ptr<float>(), tokens, hidden, experts, units / experts,
            {}, {}};
  int64_t work = 0;
  for (int64_t e = 0; e < experts; ++e) {
    std::vector<int64_t> users;
    for (int64_t t = 0; t < tokens; ++t) {
      if (p.scores[t * experts + e] != 0.f) users.push_back(t);
    }
    if (!users.empty()) {
      work += static_cast<int64_t>(users.size()) + 1;  // +1: reading the weights costs even for one token
      p.active.push_back(e);
      p.users.push_back(std::move(users));
    }
  }
  float* result = out.mutable_data_ptr<float>();
  std::fill(result, result + tokens * hidden, 0.f);
  if (p.active.empty()) return true;

  const int64_t slices = std::max<int64_t>(
      1, std::min<int64_t>(executorch::extension::get_thread_count(), static_cast<int64_t>(p.active.size())));
  std::vector<size_t> bounds(slices + 1, p.active.size());
  bounds[0] = 0;
  int64_t done = 0;
  int64_t slice = 1;
  for (size_t a = 0; a < p.active.size() && slice < slices; ++a) {
    done += static_cast<int64_t>(p.users[a].size()) + 1;
    if (done * slices >= work * slice) bounds[slice++] = a + 1;
  }
  std::vector<float> partial(static_cast<size_t>((slices - 1) * tokens * hidden), 0.f);
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* y = s == 0 ? result : partial.data() + (s - 1) * tokens * hidden;
      run_slice(p, w, bounds[s], bounds[s + 1], y);
    }
  };
  if (!executorch::extension::parallel_for(0, slices, 1, body)) return false;
  for (int64_t s = 1; s < slices; ++s) {
    const float* y = partial.data() + (s - 1) * tokens * hidden;
    for (int64_t i = 0; i < tokens * hidden; ++i) result[i] += y[i];
  }
  return true;
}

// The checks every format shares: x [N, H] and scores [N, E] fp32, out resized to x's shape.
bool check_common(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& scores, Tensor& out, const char* op) {
  if (x.dim() != 2 || scores.dim() != 2 || x.scalar_type() != ScalarType::Float ||
      scores.scalar_type() != ScalarType::Float || out.scalar_type() != ScalarType::Float ||
      scores.size(0) != x.size(0) || scores.size(1) <= 0) {
    ET_LOG(Error, "%s: x [N, H] and scores [N, E] must be 2-D fp32 with the same N", op);
    ctx.fail(Error::InvalidArgument);
    return false;
  }
  if (executorch::runtime::resize_tensor(out, x.sizes()) != Error::Ok) {
    ctx.fail(Error::InvalidArgument);
    return false;
  }
  return true;
}

}  // namespace

Tensor& sparse_expert_ffn_out(
    KernelRuntimeContext& ctx,
    const Tensor& x,
    const Tensor& scores,
    const Tensor& up,
    const Tensor& down,
    Tensor& out) {
  if (!check_common(ctx, x, scores, out, "sparse_expert_ffn")) return out;
  const int64_t hidden = x.size(1), experts = scores.size(1);
  ET_KERNEL_CHECK_MSG(ctx, up.dim() == 2 && down.dim() == 2 && up.scalar_type() == ScalarType::Float &&
                               down.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "sparse_expert_ffn: up and down must be 2-D fp32");
  ET_KERNEL_CHECK_MSG(ctx, up.size(0) % experts == 0 && up.size(1) == hidden && down.size(0) == up.size(0) &&
                               down.size(1) == hidden,
                      InvalidArgument, out, "sparse_expert_ffn: shapes do not match");
  const Fp32Weights w{up.const_data_ptr<float>(), down.const_data_ptr<float>(), hidden};
  ET_KERNEL_CHECK_MSG(ctx, run(x, scores, up.size(0), w, out), Internal, out, "sparse_expert_ffn: parallel_for failed");
  return out;
}

// int8 codes: up [E*de, H] with up_scales [E*de], down [E*de, H] with down_scales [H] (fp32).
Tensor& sparse_expert_ffn_int8_out(
    KernelRuntimeContext& ctx,
    const Tensor& x,
    const Tensor& scores,
    const Tensor& up,
    const Tensor& up_scales,
    const Tensor& down,
    const Tensor& down_scales,
    Tensor& out) {
  if (!check_common(ctx, x, scores, out, "sparse_expert_ffn_int8")) return out;
  const int64_t hidden = x.size(1), experts = scores.size(1), units = up.size(0);
  ET_KERNEL_CHECK_MSG(ctx, up.scalar_type() == ScalarType::Char && down.scalar_type() == ScalarType::Char &&
                               up_scales.scalar_type() == ScalarType::Float &&
                               down_scales.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "sparse_expert_ffn_int8: int8 codes and fp32 scales only");
  ET_KERNEL_CHECK_MSG(ctx, up.dim() == 2 && down.dim() == 2 && units % experts == 0 && up.size(1) == hidden &&
                               down.size(0) == units && down.size(1) == hidden && up_scales.numel() == units &&
                               down_scales.numel() == hidden,
                      InvalidArgument, out, "sparse_expert_ffn_int8: shapes do not match");
  const Int8Weights w{up.const_data_ptr<int8_t>(), up_scales.const_data_ptr<float>(), down.const_data_ptr<int8_t>(),
                      down_scales.const_data_ptr<float>(), hidden};
  ET_KERNEL_CHECK_MSG(ctx, run(x, scores, units, w, out), Internal, out,
                      "sparse_expert_ffn_int8: parallel_for failed");
  return out;
}

// int4 codes packed two per byte (see Int4Weights): up and down [E*de, H / 2] uint8; up_scales
// [E*de, H / gu], down_scales [E*de / gd, H], both fp32 or both bf16; gu, gd multiples of 32.
Tensor& sparse_expert_ffn_int4_out(
    KernelRuntimeContext& ctx,
    const Tensor& x,
    const Tensor& scores,
    const Tensor& up,
    const Tensor& up_scales,
    const Tensor& down,
    const Tensor& down_scales,
    Tensor& out) {
  if (!check_common(ctx, x, scores, out, "sparse_expert_ffn_int4")) return out;
  const int64_t hidden = x.size(1), experts = scores.size(1), units = up.size(0);
  const ScalarType scale_type = up_scales.scalar_type();
  ET_KERNEL_CHECK_MSG(ctx, up.scalar_type() == ScalarType::Byte && down.scalar_type() == ScalarType::Byte &&
                               (scale_type == ScalarType::Float || scale_type == ScalarType::BFloat16) &&
                               down_scales.scalar_type() == scale_type,
                      InvalidArgument, out, "sparse_expert_ffn_int4: uint8 codes and fp32 or bf16 scales only");
  ET_KERNEL_CHECK_MSG(ctx, up.dim() == 2 && down.dim() == 2 && up_scales.dim() == 2 && down_scales.dim() == 2 &&
                               hidden % 32 == 0 && units % experts == 0 && up.size(1) == hidden / 2 &&
                               down.size(0) == units && down.size(1) == hidden / 2 && up_scales.size(0) == units &&
                               up_scales.size(1) > 0 && hidden % up_scales.size(1) == 0 &&
                               down_scales.size(1) == hidden && down_scales.size(0) > 0 &&
                               units % down_scales.size(0) == 0,
                      InvalidArgument, out, "sparse_expert_ffn_int4: shapes do not match");
  const int64_t up_group = hidden / up_scales.size(1), down_group = units / down_scales.size(0);
  bool ok;
  if (scale_type == ScalarType::Float) {
    const Int4Weights<float> w{up.const_data_ptr<uint8_t>(), up_scales.const_data_ptr<float>(),
                               down.const_data_ptr<uint8_t>(), down_scales.const_data_ptr<float>(),
                               hidden, up_group, down_group};
    ok = run(x, scores, units, w, out);
  } else {
    const Int4Weights<uint16_t> w{up.const_data_ptr<uint8_t>(),
                                  static_cast<const uint16_t*>(up_scales.const_data_ptr()),
                                  down.const_data_ptr<uint8_t>(),
                                  static_cast<const uint16_t*>(down_scales.const_data_ptr()),
                                  hidden, up_group, down_group};
    ok = run(x, scores, units, w, out);
  }
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "sparse_expert_ffn_int4: parallel_for failed");
  return out;
}

}  // namespace native
}  // namespace cpm_mobile

EXECUTORCH_LIBRARY(cpm_mobile, "sparse_expert_ffn.out", cpm_mobile::native::sparse_expert_ffn_out);
EXECUTORCH_LIBRARY(cpm_mobile, "sparse_expert_ffn_int8.out", cpm_mobile::native::sparse_expert_ffn_int8_out);
EXECUTORCH_LIBRARY(cpm_mobile, "sparse_expert_ffn_int4.out", cpm_mobile::native::sparse_expert_ffn_int4_out);
