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
// Plain C++ written for the compiler's auto-vectoriser (fixed-width inner loops with independent
// accumulators): no intrinsics, so the same source builds for x86 and ARM (NEON).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

struct Problem {
  const float* x;
  const float* scores;
  const float* up;
  const float* down;
  int64_t tokens, hidden, experts, width;
  // For each active expert (ascending id): its id and the tokens that use it.
  std::vector<int64_t> active;
  std::vector<std::vector<int64_t>> users;
};

// Accumulates the experts active[first, last) into y [N, H] (zeroed by the caller). Each weight
// row is read from memory once per call; the other tokens using it find it in L1.
void run_slice(const Problem& p, size_t first, size_t last, float* y) {
  for (size_t a = first; a < last; ++a) {
    const int64_t e = p.active[a];
    for (int64_t j = 0; j < p.width; ++j) {
      const int64_t unit = e * p.width + j;
      const float* up_row = p.up + unit * p.hidden;
      const float* down_row = p.down + unit * p.hidden;
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

}  // namespace

Tensor& sparse_expert_ffn_out(
    KernelRuntimeContext& ctx,
    const Tensor& x,
    const Tensor& scores,
    const Tensor& up,
    const Tensor& down,
    Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 2 && scores.dim() == 2 && up.dim() == 2 && down.dim() == 2,
                      InvalidArgument, out, "sparse_expert_ffn: x, scores, up, down must be 2-D");
  ET_KERNEL_CHECK_MSG(ctx,
                      x.scalar_type() == ScalarType::Float && scores.scalar_type() == ScalarType::Float &&
                          up.scalar_type() == ScalarType::Float && down.scalar_type() == ScalarType::Float &&
                          out.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "sparse_expert_ffn: fp32 tensors only");
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = scores.size(1);
  ET_KERNEL_CHECK_MSG(ctx, scores.size(0) == tokens && experts > 0 && up.size(0) % experts == 0 &&
                               up.size(1) == hidden && down.size(0) == up.size(0) && down.size(1) == hidden,
                      InvalidArgument, out, "sparse_expert_ffn: shapes do not match");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, out);

  Problem p{x.const_data_ptr<float>(), scores.const_data_ptr<float>(), up.const_data_ptr<float>(),
            down.const_data_ptr<float>(), tokens, hidden, experts, up.size(0) / experts, {}, {}};
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
  if (p.active.empty()) return out;

  // Contiguous slices of about equal work, one per thread; slice 0 accumulates into `out`.
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
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* y = s == 0 ? result : partial.data() + (s - 1) * tokens * hidden;
      run_slice(p, bounds[s], bounds[s + 1], y);
    }
  };
  ET_KERNEL_CHECK_MSG(ctx, executorch::extension::parallel_for(0, slices, 1, run), Internal, out,
                      "sparse_expert_ffn: parallel_for failed");
  for (int64_t s = 1; s < slices; ++s) {
    const float* y = partial.data() + (s - 1) * tokens * hidden;
    for (int64_t i = 0; i < tokens * hidden; ++i) result[i] += y[i];
  }
  return out;
}

}  // namespace native
}  // namespace cpm_mobile

EXECUTORCH_LIBRARY(cpm_mobile, "sparse_expert_ffn.out", cpm_mobile::native::sparse_expert_ffn_out);
