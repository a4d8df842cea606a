// The row kernel of the fused linear -> NGRPO loss (step 2 of the schedule) for CPUs.
//
// For each token row of a chunk of logits (OpenMP over rows): logsumexp, the target log-prob, the
// entropy, the NGRPO per-token loss (asymmetric clip, dual clip, k3 KL, importance weights, entropy
// bonus) with its aggregation weight, the metric sums, and dZ = d loss / d logits written in place.
// Two passes over a row: an online max / sum-exp / exp-weighted-logit pass, then the dZ pass. The
// same contract as ngrpo_kernels/ops/fused_loss/row_triton.py and row_torch.py (see there for the
// algebra); registered as torch.ops.ngrpo_kernels.loss_rows.
//
// This file is compiled with -ffast-math so that GCC vectorises expf through glibc's libmvec. The compiler
// may then assume no inf or NaN, so a comparison or max cannot be trusted to see them: a token whose
// statistics or inputs are not finite (NaN or inf in hidden states or weights, validate=False) is found
// by testing the bits (`finite`) and gets a NaN loss and gradient, never a finite value. Masked rows
// are skipped before any arithmetic; a target outside [0, V) is never read or written.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

namespace {

enum Stat { LOSS = 0, CLIPPED, LOG_RATIO, ADV, ENTROPY, KL_REF, DUAL_CLIPPED, LOGPROB, NUM_STATS };

struct Options {
  float inv_temp, eps_neg, eps_pos, clip_c, beta, entropy_coef;
  bool dual_clip, has_ref, has_isw, on_policy, need_grad;
};

template <typename OutT>
inline OutT cast_out(float v) { return static_cast<OutT>(v); }

// Neither NaN nor +-inf, read from the bits behind a compiler barrier (-ffinite-math-only would fold
// std::isfinite to true).
inline bool finite(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  asm volatile("" : "+r"(bits));
  return (bits & 0x7f800000u) != 0x7f800000u;
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The row loops. Each exists with and without a bias (a per-element `bias ? ... : 0` stops GCC from
// vectorising under -fopenmp), and is compiled twice (AVX2+FMA and baseline x86-64), picked at load
// time by the CPU (GCC target_clones; glibc's libmvec supplies the matching vector expf).
#define NGRPO_CLONES __attribute__((target_clones("avx2,fma", "default")))

// Pass 1: max, sum of exp(zz - max) and sum of exp(zz - max) * (zz - max), zz = (z + b) * it. The entropy
// is then log(sum) - E_p[zz - max]: no cancellation between two large numbers when every logit is large.
NGRPO_CLONES void row_softmax_stats(const float* z, const float* bias, int64_t V, float it, float* out) {
  float m = -std::numeric_limits<float>::max(), s = 0.f, u = 0.f;
  if (bias) {
    #pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) m = std::max(m, (z[v] + bias[v]) * it);
    #pragma omp simd reduction(+ : s, u)
    for (int64_t v = 0; v < V; ++v) {
      const float d = (z[v] + bias[v]) * it - m;
      const float p = std::exp(d);
      s += p;
      u += p * d;
    }
  } else {
    #pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) m = std::max(m, z[v] * it);
    #pragma omp simd reduction(+ : s, u)
    for (int64_t v = 0; v < V; ++v) {
      const float d = z[v] * it - m;
      const float p = std::exp(d);
      s += p;
      u += p * d;
    }
  }
  out[0] = m;
  out[1] = s;
  out[2] = u;
}

// Pass 2: dz_v = (-g_lp p_v - g_H p_v (log p_v + H)) * it, log p_v = (zz_v - m) - log s (zz_v - E_p[zz] =
// log p_v + H); the caller writes the target's entry. dz may alias z (float32). log p is taken relative to the
// row max m, not as zz_v - lse: lse = m + log s carries an absolute error of ulp(m), which for a confident
// token (1 - p of 1e-5 at logits ~20) became a relative error of tens of percent in its gradient.
template <typename OutT>
inline void row_grad_impl(const float* z, const float* bias, OutT* dz, int64_t V, float it, float m, float log_s,
                          float H, float g_lp, float g_H) {
  if (bias) {
    #pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float lp = ((z[v] + bias[v]) * it - m) - log_s;
      const float p = std::exp(lp);
      dz[v] = cast_out<OutT>((-g_lp * p - g_H * p * (lp + H)) * it);
    }
  } else {
    #pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float lp = (z[v] * it - m) - log_s;
      const float p = std::exp(lp);
      dz[v] = cast_out<OutT>((-g_lp * p - g_H * p * (lp + H)) * it);
    }
  }
}

NGRPO_CLONES void row_grad(const float* z, const float* bias, float* dz, int64_t V, float it, float m, float log_s,
                           float H, float g_lp, float g_H) {
  row_grad_impl(z, bias, dz, V, it, m, log_s, H, g_lp, g_H);
}

NGRPO_CLONES void row_grad(const float* z, const float* bias, at::BFloat16* dz, int64_t V, float it, float m,
                           float log_s, float H, float g_lp, float g_H) {
  row_grad_impl(z, bias, dz, V, it, m, log_s, H, g_lp, g_H);
}

// One row: z (raw logits, V floats) -> statistics and, when asked, dz (V values of OutT, may alias z).
template <typename OutT>
void one_row(const float* z, OutT* dz, const float* bias, int64_t V, int64_t target, float w, float A,
             float old_lp, float ref_lp, float isw, const Options& o, double* stats) {
  const float it = o.inv_temp;
  float msu[3];
  row_softmax_stats(z, bias, V, it, msu);
  const float log_s = std::log(msu[1]);
  const float lse = msu[0] + log_s;
  const float mean_d = msu[2] / msu[1];  // E_p[zz - max]
  const bool target_ok = target >= 0 && target < V;  // outside [0, V) only with validate=False
  const float zt = target_ok ? (z[target] + (bias ? bias[target] : 0.f)) * it : kNaN;
  const bool ok = finite(lse) && finite(mean_d) && finite(zt) && finite(A) && (o.on_policy || finite(old_lp)) &&
                  (!o.has_ref || finite(ref_lp)) && (!o.has_isw || finite(isw));
  // Rounding can leave log(sum) - E_p[zz - max] a hair below 0 for a near one-hot softmax: entropy is >= 0.
  const float H = finite(lse) && finite(mean_d) ? std::max(log_s - mean_d, 0.0f) : kNaN;
  const float lp = ok ? (zt - msu[0]) - log_s : kNaN;  // relative to the max, as in row_grad
  const float old = o.on_policy ? lp : old_lp;

  // The per-token loss (SPEC §3), same branch rules as the Triton and PyTorch paths. A = 0 gives 0 even where
  // the ratio overflows to inf.
  const float ratio = std::exp(lp - old);
  const float pg_unclipped = A == 0.f ? 0.f : -A * ratio;
  const float pg_clipped = -A * std::min(std::max(ratio, 1.f - o.eps_neg), 1.f + o.eps_pos);
  const bool clipped = pg_clipped > pg_unclipped;
  float loss = std::max(pg_unclipped, pg_clipped);
  float dloss = clipped ? 0.f : pg_unclipped;
  bool dual = false;
  if (o.dual_clip) {
    const float bound = -A * o.clip_c;
    dual = (A < 0.f) && (bound < loss);
    if (dual) { loss = bound; dloss = 0.f; }
  }
  // A weight of 0 (a token the rollout correction masks out) or beta = 0 (a KL only logged) gives 0, also where
  // the ratio or exp(log_r) overflows to inf (0 * inf would be NaN).
  if (o.has_isw) {
    loss = isw == 0.f ? 0.f : loss * isw;
    dloss = isw == 0.f ? 0.f : dloss * isw;
  }
  float k3 = 0.f;
  if (o.has_ref) {
    const float log_r = ref_lp - lp;
    const float e = std::exp(log_r);
    k3 = e - log_r - 1.f;
    if (o.beta != 0.f) {
      loss += o.beta * k3;
      dloss += o.beta * (1.f - e);
    }
  }
  loss -= o.entropy_coef * H;
  if (!ok) loss = dloss = kNaN;  // the comparisons above may have dropped a NaN

  stats[LOSS] += static_cast<double>(w) * loss;
  stats[CLIPPED] += clipped ? 1.0 : 0.0;
  stats[LOG_RATIO] += old - lp;
  stats[ADV] += A;
  stats[ENTROPY] += H;
  stats[KL_REF] += k3;
  stats[DUAL_CLIPPED] += dual ? 1.0 : 0.0;
  stats[LOGPROB] += lp;

  if (!o.need_grad) return;
  // On policy (old = logp, ratio == 1 exactly) the ratio's own dependence on logp is what dloss holds.
  const float g_lp = w * dloss, g_H = -o.entropy_coef * w;
  row_grad(z, bias, dz, V, it, msu[0], log_s, H, g_lp, g_H);
  // The target's entry in float32 from zt (z itself may be overwritten by now), rounded once: g_lp (1 - p_t)
  // for a confident token is far below the rounding error of a bf16 -g_lp p_t.
  if (target_ok) {
    const float lp_t = (zt - msu[0]) - log_s, p_t = std::exp(lp_t);
    dz[target] = cast_out<OutT>((g_lp * (1.f - p_t) - g_H * p_t * (lp_t + H)) * it);
  }
}

template <typename OutT>
void zero_row(OutT* dz, int64_t V) {
  std::fill(dz, dz + V, cast_out<OutT>(0.f));
}

template <typename OutT>
at::Tensor run(const at::Tensor& z, const std::optional<at::Tensor>& dz, const std::optional<at::Tensor>& bias,
               const at::Tensor& target, const at::Tensor& valid, const at::Tensor& weight, const at::Tensor& adv,
               const at::Tensor& old, const std::optional<at::Tensor>& ref, const std::optional<at::Tensor>& isw,
               const Options& o) {
  const int64_t N = z.size(0), V = z.size(1);
  const float* zp = z.data_ptr<float>();
  OutT* dzp = o.need_grad ? dz->data_ptr<OutT>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t* tp = target.data_ptr<int64_t>();
  const bool* vp = valid.data_ptr<bool>();
  const float* wp = weight.data_ptr<float>();
  const float* ap = adv.data_ptr<float>();
  const float* op = old.data_ptr<float>();
  const float* rp = ref ? ref->data_ptr<float>() : nullptr;
  const float* ip = isw ? isw->data_ptr<float>() : nullptr;
  // One row of partial sums per token (double), summed in a fixed order below: deterministic.
  at::Tensor partial = at::zeros({N, NUM_STATS}, z.options().dtype(at::kDouble));
  double* pp = partial.data_ptr<double>();
  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      if (!vp[r]) {
        if (dzp) zero_row(dzp + r * V, V);
        continue;
      }
      one_row<OutT>(zp + r * V, dzp ? dzp + r * V : nullptr, bp, V, tp[r], wp[r], ap[r], op[r],
                    rp ? rp[r] : 0.f, ip ? ip[r] : 1.f, o, pp + r * NUM_STATS);
    }
  });
  return partial.sum(0).to(at::kFloat);
}

at::Tensor loss_rows(const at::Tensor& z, const std::optional<at::Tensor>& dz, const std::optional<at::Tensor>& bias,
                     const at::Tensor& target, const at::Tensor& valid, const at::Tensor& weight,
                     const at::Tensor& adv, const at::Tensor& old, const std::optional<at::Tensor>& ref,
                     const std::optional<at::Tensor>& isw, double inv_temp, double eps_neg, double eps_pos,
                     std::optional<double> clip_c, double beta, double entropy_coef, bool on_policy,
                     bool need_grad) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.scalar_type() == at::kFloat && z.is_contiguous(),
              "loss_rows: z must be a contiguous 2-d float32 CPU tensor");
  const int64_t N = z.size(0), V = z.size(1);
  auto check_vec = [&](const at::Tensor& t, at::ScalarType ty, int64_t n, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.scalar_type() == ty && t.is_contiguous(),
                "loss_rows: ", name, " must be a contiguous 1-d CPU tensor of length ", n, " and dtype ", ty);
  };
  check_vec(target, at::kLong, N, "target");
  check_vec(valid, at::kBool, N, "valid");
  check_vec(weight, at::kFloat, N, "weight");
  check_vec(adv, at::kFloat, N, "adv");
  check_vec(old, at::kFloat, N, "old");
  if (bias) check_vec(*bias, at::kFloat, V, "bias");
  if (ref) check_vec(*ref, at::kFloat, N, "ref");
  if (isw) check_vec(*isw, at::kFloat, N, "isw");
  Options o{static_cast<float>(inv_temp), static_cast<float>(eps_neg), static_cast<float>(eps_pos),
            static_cast<float>(clip_c.value_or(0.0)), static_cast<float>(beta), static_cast<float>(entropy_coef),
            clip_c.has_value(), ref.has_value(), isw.has_value(), on_policy, need_grad};
  if (!need_grad) return run<float>(z, std::nullopt, bias, target, valid, weight, adv, old, ref, isw, o);
  TORCH_CHECK(dz && dz->sizes() == z.sizes() && dz->is_contiguous(), "loss_rows: dz must match z");
  if (dz->scalar_type() == at::kFloat) return run<float>(z, dz, bias, target, valid, weight, adv, old, ref, isw, o);
  TORCH_CHECK(dz->scalar_type() == at::kBFloat16 && !dz->is_alias_of(z),
              "loss_rows: dz must be float32, or a separate bfloat16 buffer");
  return run<at::BFloat16>(z, dz, bias, target, valid, weight, adv, old, ref, isw, o);
}

}  // namespace

TORCH_LIBRARY(ngrpo_kernels, m) {
  m.def("loss_rows(Tensor z, Tensor(a!)? dz, Tensor? bias, Tensor target, Tensor valid, Tensor weight, "
        "Tensor adv, Tensor old, Tensor? ref, Tensor? isw, float inv_temp, float eps_neg, float eps_pos, "
        "float? clip_c, float beta, float entropy_coef, bool on_policy, bool need_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(ngrpo_kernels, CPU, m) {
  m.impl("loss_rows", &loss_rows);
}
