// cpm_mobile::gated_delta_rule.out: the gated delta rule of Qwen3.5's linear-attention layers over T tokens.
//
//   q, k [1, T, H, Dk] (L2-normalised), v [1, T, H, Dv], g, beta [1, T, H], state [1, H, Dk, Dv]; scale
//   per head, per token:  S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  out_t = scale S^T q_t
//   out [1, T, H, Dv], state_out [1, H, Dk, Dv] (S after the last token)
//
// exporter/kernels/ops.py defines the op and its eager form (transformers' torch_recurrent_gated_delta_rule).
// One kernel for any T, so a .pte prefills and decodes through the same graph without a loop over a
// dynamic length. Each token takes two passes over S (Dk x Dv fp32, 64 KB at 128 x 128: L2-resident): the
// first forms S^T k with the decay folded in, the second updates S and forms S^T q from the new rows.
// Heads are independent and split over ExecuTorch's threadpool. Activations and state are fp32.
//
// Why by hand: no ExecuTorch kernel (portable, optimized or XNNPACK) computes a recurrence, and the
// boxed-kernel helper (EXECUTORCH_LIBRARY) takes exactly one out tensor, while this op has two: the
// kernel reads its arguments off the stack as the emitter lays them out (inputs, then the out
// arguments, then the returned TensorList).
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace cpm_mobile {
namespace native {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

namespace {

struct Problem {
  const float *q, *k, *v, *g, *beta, *state;
  float* out;
  float* state_out;
  int64_t tokens, heads, dk, dv;
  float scale;
};

void run_head(const Problem& p, int64_t h, float* s, float* memory) {
  const int64_t dk = p.dk, dv = p.dv;
  std::memcpy(s, p.state + h * dk * dv, sizeof(float) * dk * dv);
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int64_t row = t * p.heads + h;
    const float* q = p.q + row * dk;
    const float* k = p.k + row * dk;
    const float* v = p.v + row * dv;
    const float decay = std::exp(p.g[row]);
    const float beta = p.beta[row];
    // memory = (decay S)^T k
    for (int64_t j = 0; j < dv; ++j) memory[j] = 0.0f;
    for (int64_t i = 0; i < dk; ++i) {
      const float ki = k[i];
      const float* si = s + i * dv;
      for (int64_t j = 0; j < dv; ++j) memory[j] += si[j] * ki;
    }
    for (int64_t j = 0; j < dv; ++j) memory[j] = (v[j] - memory[j] * decay) * beta;  // delta
    float* out = p.out + row * dv;
    for (int64_t j = 0; j < dv; ++j) out[j] = 0.0f;
    for (int64_t i = 0; i < dk; ++i) {
      const float ki = k[i], qi = q[i];
      float* si = s + i * dv;
      for (int64_t j = 0; j < dv; ++j) {
        si[j] = si[j] * decay + ki * memory[j];
        out[j] += si[j] * qi;
      }
    }
    for (int64_t j = 0; j < dv; ++j) out[j] *= p.scale;
  }
  std::memcpy(p.state_out + h * dk * dv, s, sizeof(float) * dk * dv);
}

bool is_float(const Tensor& t, int64_t dims) {
  return t.scalar_type() == ScalarType::Float && t.dim() == dims;
}

void gated_delta_rule_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const Tensor& g = stack[3]->toTensor();
  const Tensor& beta = stack[4]->toTensor();
  const Tensor& state = stack[5]->toTensor();
  const double scale = stack[6]->toDouble();
  Tensor& out = stack[7]->toTensor();
  Tensor& state_out = stack[8]->toTensor();
  const bool shapes = is_float(q, 4) && is_float(k, 4) && is_float(v, 4) && is_float(g, 3) && is_float(beta, 3) &&
                      is_float(state, 4) && is_float(out, 4) && is_float(state_out, 4) && q.size(0) == 1 &&
                      k.size(1) == q.size(1) && v.size(1) == q.size(1) && k.size(2) == q.size(2) &&
                      v.size(2) == q.size(2) && k.size(3) == q.size(3) && g.size(1) == q.size(1) &&
                      g.size(2) == q.size(2) && beta.size(1) == q.size(1) && beta.size(2) == q.size(2) &&
                      state.size(1) == q.size(2) && state.size(2) == q.size(3) && state.size(3) == v.size(3);
  if (!shapes) {
    ET_LOG(Error, "gated_delta_rule: fp32 q, k [1, T, H, Dk], v [1, T, H, Dv], g, beta [1, T, H], "
                  "state [1, H, Dk, Dv] expected");
    ctx.fail(Error::InvalidArgument);
    return;
  }
  if (executorch::runtime::resize_tensor(out, v.sizes()) != Error::Ok ||
      executorch::runtime::resize_tensor(state_out, state.sizes()) != Error::Ok) {
    ET_LOG(Error, "gated_delta_rule: cannot resize the outputs");
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const Problem p{q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                  g.const_data_ptr<float>(), beta.const_data_ptr<float>(), state.const_data_ptr<float>(),
                  out.mutable_data_ptr<float>(), state_out.mutable_data_ptr<float>(), q.size(1), q.size(2),
                  q.size(3), v.size(3), static_cast<float>(scale)};
  const bool ok = executorch::extension::parallel_for(0, p.heads, 1, [&](int64_t begin, int64_t end) {
    // Per thread: S in working memory, so state_out may be the very buffer state is (read whole first).
    std::vector<float> s(p.dk * p.dv), memory(p.dv);
    for (int64_t h = begin; h < end; ++h) run_head(p, h, s.data(), memory.data());
  });
  if (!ok) {
    ET_LOG(Error, "gated_delta_rule: parallel_for failed");
    ctx.fail(Error::Internal);
  }
}

}  // namespace
}  // namespace native
}  // namespace cpm_mobile

static auto registered_gated_delta_rule = ::executorch::runtime::register_kernel(
    ::executorch::runtime::Kernel("cpm_mobile::gated_delta_rule.out", cpm_mobile::native::gated_delta_rule_out));
