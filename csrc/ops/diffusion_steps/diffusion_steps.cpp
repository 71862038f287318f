// Sampling-step op family: schemas, argument checks, the device-agnostic op bodies and the CPU registration.
// The per-device passes live in diffusion_steps_cpu.cpp and diffusion_steps_cuda.cu; the maths in
// diffusion_steps_math.h.
#include "ops/diffusion_steps/diffusion_steps.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "common/checks.h"

namespace mmer_ext::diffusion {
namespace {

void check_state(const at::Tensor& x, const char* op, const char* name) {
  check_defined(x, op, {name});
  check_floating(x, op, {name});
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must be [B, ...] with a batch dimension first, got a 0-d tensor");
  TORCH_CHECK(!x.is_cpu() || x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " on the CPU must be float32 or float64, got ", x.scalar_type(),
              " (float16 and bfloat16 are supported on CUDA)");
}

// score / eps / noise: same shape, dtype and device as x.
void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name, const char* x_name) {
  check_defined(t, op, {name});
  check_floating(t, op, {name});
  check_same_device(t, x, op, {name}, {x_name});
  check_same_dtype(t, x, op, {name}, {x_name});
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", x_name, " has shape ",
              x.sizes(), "; they must match");
}

ParamArg make_param(const at::Tensor& p, const at::Tensor& x, const char* op, const char* name, const char* x_name) {
  check_defined(p, op, {name});
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": ", name,
              " must be a Python float or a floating-point tensor, got dtype ", p.scalar_type());
  if (p.dim() == 0) {
    // A 0-d CPU tensor is read here, on the host: no device sync, so a CUDA op stays graph-capturable (the value
    // is then fixed in the graph).
    if (p.is_cpu()) return ParamArg{at::Tensor(), p.item<double>()};
    TORCH_CHECK(p.device() == x.device(), op, ": ", name, " is a 0-d tensor on ", p.device(), " but ", x_name,
                " is on ", x.device(), "; use a Python float, a 0-d CPU tensor or a tensor on ", x_name, "'s device");
    return ParamArg{p, 0.0};
  }
  TORCH_CHECK(p.dim() == 1, op, ": ", name, " must be a Python float, a 0-d tensor or a [B] tensor, got shape ",
              p.sizes());
  TORCH_CHECK(p.size(0) == x.size(0), op, ": ", name, " has ", p.size(0), " values but ", x_name,
              " has batch size ", x.size(0), "; pass one value per sample or a 0-d tensor");
  TORCH_CHECK(p.device() == x.device(), op, ": ", name, " is a [B] tensor on ", p.device(), " but ", x_name,
              " is on ", x.device(), "; move it to ", x_name, "'s device (only 0-d tensors may stay on the CPU)");
  return ParamArg{p, 0.0};
}

// Values of a parameter must lie in (0, 1]: checked where they are on the host (a CUDA tensor is not read back).
void check_alpha_bar(const ParamArg& p, const char* op, const char* name) {
  if (!p.tensor.defined()) {
    TORCH_CHECK(p.value > 0.0 && p.value <= 1.0, op, ": ", name, " must be in (0, 1], got ", p.value);
  } else if (p.tensor.is_cpu() && p.tensor.numel() > 0) {
    const auto bad = (p.tensor <= 0).logical_or_(p.tensor > 1).logical_or_(p.tensor.isnan());
    TORCH_CHECK(!bad.any().item<bool>(), op, ": ", name, " must be in (0, 1], got min ",
                p.tensor.min().item<double>(), " and max ", p.tensor.max().item<double>());
  }
}

// Times of the VE SDE must be finite and >= 0: below 0, sigma^(2t) - 1 < 0 and the marginal std is NaN. Values
// are checked where they are on the host (a tensor on a GPU is not read back, as for alpha_bar).
void check_time_values(const at::Tensor& t, const char* op, const char* name) {
  if (!t.is_cpu() || t.numel() == 0) return;
  const auto flat = t.reshape({-1});
  const auto bad = at::logical_not(at::isfinite(flat)).logical_or_(flat < 0);
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK(false, op, ": ", name, " must be finite and >= 0 (time runs forward from 0), got ",
              flat[i].item<double>(), t.dim() > 0 ? " at flat index " : "", t.dim() > 0 ? std::to_string(i) : "");
}

void check_time(const ParamArg& p, const char* op, const char* name) {
  if (!p.tensor.defined()) {
    TORCH_CHECK(std::isfinite(p.value) && p.value >= 0.0, op, ": ", name,
                " must be finite and >= 0 (time runs forward from 0), got ", p.value);
  } else {
    check_time_values(p.tensor, op, name);
  }
}

double checked_log_sigma(double sigma, const char* op) {
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0.0 && sigma != 1.0, op,
              ": sigma must be positive, finite and != 1 (the VE SDE divides by ln sigma), got ", sigma);
  return std::log(sigma);
}

void check_dt(double dt, const char* op) {
  TORCH_CHECK(std::isfinite(dt) && dt >= 0.0, op,
              ": dt must be finite and >= 0 (the step size of the reverse-time step, t -> t - dt), got ", dt);
}

// noise= and generator= are exclusive; returns where the noise comes from.
NoiseSource noise_source(const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator,
                         const at::Tensor& x, const char* op, const char* x_name) {
  TORCH_CHECK(!(noise.has_value() && generator.has_value()), op,
              ": pass noise= (an explicit tensor) or generator= (noise drawn in the kernel), not both");
  if (noise.has_value()) {
    check_like(*noise, x, op, "noise", x_name);
    return NoiseSource::kTensor;
  }
  if (generator.has_value()) {
    TORCH_CHECK(generator->defined(), op, ": generator is an undefined generator");
    TORCH_CHECK(generator->device().type() == x.device().type(), op, ": generator is a ", generator->device(),
                " generator but ", x_name, " is on ", x.device(), "; pass a generator of ", x_name, "'s device");
  }
  return NoiseSource::kGenerator;
}

StepPlan base_plan(StepKind kind, const at::Tensor& x, const at::Tensor* score, const std::optional<at::Tensor>& noise,
                   NoiseSource source, const std::optional<at::Generator>& generator) {
  StepPlan plan;
  plan.kind = kind;
  plan.x = x.contiguous();
  if (score != nullptr) plan.score = score->contiguous();
  plan.noise_source = source;
  if (source == NoiseSource::kTensor) plan.noise = noise->contiguous();
  if (source == NoiseSource::kGenerator) plan.generator = generator;
  plan.inner = x.size(0) > 0 ? x.numel() / x.size(0) : 1;
  return plan;
}

at::Tensor empty_like_contiguous(const at::Tensor& x) { return at::empty(x.sizes(), x.options()); }

// VE coefficients of t elementwise, in float32 (float64) arithmetic whatever t's dtype.
at::Tensor ve_coefficient(const at::Tensor& t, double sigma, bool marginal_std, const char* op) {
  check_defined(t, op, {"t"});
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": t must be a Python float or a floating-point tensor, got ",
              t.scalar_type());
  check_time_values(t, op, "t");
  const double log_sigma = checked_log_sigma(sigma, op);
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto tt = t.to(acc);
  auto out = marginal_std ? at::sqrt(at::expm1(tt * (2.0 * log_sigma)).div_(2.0 * log_sigma))
                          : at::exp(tt * log_sigma);
  return out.to(t.scalar_type());
}

}  // namespace

at::Tensor ve_marginal_std(const at::Tensor& t, double sigma) {
  return ve_coefficient(t, sigma, true, "mmer_ext.ve_marginal_std");
}

at::Tensor ve_diffusion_coeff(const at::Tensor& t, double sigma) {
  return ve_coefficient(t, sigma, false, "mmer_ext.ve_diffusion_coeff");
}

at::Tensor ve_perturb(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& t, double sigma,
                      const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator) {
  constexpr const char* op = "mmer_ext.ve_perturb";
  check_state(x, op, "x");
  auto p0 = make_param(t, x, op, "t", "x");
  check_time(p0, op, "t");
  const double log_sigma = checked_log_sigma(sigma, op);
  const auto source = noise_source(noise, generator, x, op, "x");
  auto plan = base_plan(StepKind::kPerturb, x, nullptr, noise, source, generator);
  plan.p0 = std::move(p0);
  plan.log_sigma = log_sigma;
  plan.next = empty_like_contiguous(x);
  k.affine_step(plan);
  return plan.next;
}

std::tuple<at::Tensor, at::Tensor> ve_sde_em_step(const DeviceKernels& k, const at::Tensor& x,
                                                  const at::Tensor& score, const at::Tensor& t, double dt,
                                                  double sigma, const std::optional<at::Tensor>& noise,
                                                  const std::optional<at::Generator>& generator) {
  constexpr const char* op = "mmer_ext.ve_sde_em_step";
  check_state(x, op, "x");
  check_like(score, x, op, "score", "x");
  auto p0 = make_param(t, x, op, "t", "x");
  check_time(p0, op, "t");
  check_dt(dt, op);
  const double log_sigma = checked_log_sigma(sigma, op);
  const auto source = noise_source(noise, generator, x, op, "x");
  auto plan = base_plan(StepKind::kEulerMaruyama, x, &score, noise, source, generator);
  plan.p0 = std::move(p0);
  plan.log_sigma = log_sigma;
  plan.dt = dt;
  plan.mean = empty_like_contiguous(x);
  plan.next = empty_like_contiguous(x);
  k.affine_step(plan);
  return {plan.next, plan.mean};
}

at::Tensor ve_ode_step(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& score, const at::Tensor& t,
                       double dt, double sigma) {
  constexpr const char* op = "mmer_ext.ve_ode_step";
  check_state(x, op, "x");
  check_like(score, x, op, "score", "x");
  auto p0 = make_param(t, x, op, "t", "x");
  check_time(p0, op, "t");
  check_dt(dt, op);
  const double log_sigma = checked_log_sigma(sigma, op);
  auto plan = base_plan(StepKind::kOde, x, &score, std::nullopt, NoiseSource::kNone, std::nullopt);
  plan.p0 = std::move(p0);
  plan.log_sigma = log_sigma;
  plan.dt = dt;
  plan.mean = empty_like_contiguous(x);
  k.affine_step(plan);
  return plan.mean;
}

std::tuple<at::Tensor, at::Tensor> langevin_corrector_step(const DeviceKernels& k, const at::Tensor& x,
                                                           const at::Tensor& score, double snr,
                                                           const std::optional<at::Tensor>& noise,
                                                           const std::optional<at::Generator>& generator) {
  constexpr const char* op = "mmer_ext.langevin_corrector_step";
  check_state(x, op, "x");
  check_like(score, x, op, "score", "x");
  TORCH_CHECK(std::isfinite(snr) && snr >= 0.0, op, ": snr must be finite and >= 0, got ", snr);
  const auto source = noise_source(noise, generator, x, op, "x");
  auto plan = base_plan(StepKind::kLangevin, x, &score, noise, source, generator);
  plan.snr = snr;
  plan.mean = empty_like_contiguous(x);
  plan.next = empty_like_contiguous(x);
  k.langevin_step(plan);
  return {plan.next, plan.mean};
}

std::tuple<at::Tensor, at::Tensor> ddim_step(const DeviceKernels& k, const at::Tensor& x_t, const at::Tensor& eps,
                                             const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                             double eta, const std::optional<at::Tensor>& noise,
                                             const std::optional<at::Generator>& generator) {
  constexpr const char* op = "mmer_ext.ddim_step";
  check_state(x_t, op, "x_t");
  check_like(eps, x_t, op, "eps", "x_t");
  auto p0 = make_param(alpha_bar_t, x_t, op, "alpha_bar_t", "x_t");
  auto p1 = make_param(alpha_bar_prev, x_t, op, "alpha_bar_prev", "x_t");
  check_alpha_bar(p0, op, "alpha_bar_t");
  check_alpha_bar(p1, op, "alpha_bar_prev");
  TORCH_CHECK(std::isfinite(eta) && eta >= 0.0, op, ": eta must be finite and >= 0 (0: deterministic DDIM), got ",
              eta);
  auto source = noise_source(noise, generator, x_t, op, "x_t");
  // eta = 0 is deterministic: the noise coefficient is 0, so no noise is read or drawn (the generator does not
  // advance).
  if (eta == 0.0) source = NoiseSource::kNone;
  auto plan = base_plan(StepKind::kDdim, x_t, &eps, noise, source, generator);
  plan.p0 = std::move(p0);
  plan.p1 = std::move(p1);
  plan.eta = eta;
  plan.mean = empty_like_contiguous(x_t);
  plan.next = empty_like_contiguous(x_t);
  k.affine_step(plan);
  return {plan.next, plan.mean};
}

}  // namespace mmer_ext::diffusion

TORCH_LIBRARY_FRAGMENT(mmer_ext, m) {
  // Fake kernels and autograd formulas are registered from this Python module.
  m.set_python_module("mmer_ext.ops.diffusion_steps");
  // t, alpha_bar_*: a 0-d tensor (a CPU one is read on the host) or a [B] tensor on x's device; the Python
  // wrappers turn floats into 0-d CPU tensors. noise= and generator= are exclusive; neither draws from the default
  // generator of x's device. noise and generator are positional here only because torch.library.register_autograd
  // refuses kwarg-only tensors; the Python wrappers take them as keywords.
  m.def("ve_marginal_std(Tensor t, float sigma=25.0) -> Tensor");
  m.def("ve_diffusion_coeff(Tensor t, float sigma=25.0) -> Tensor");
  m.def("ve_perturb(Tensor x, Tensor t, float sigma=25.0, Tensor? noise=None, Generator? generator=None) -> Tensor");
  m.def(
      "ve_sde_em_step(Tensor x, Tensor score, Tensor t, float dt, float sigma=25.0, Tensor? noise=None, "
      "Generator? generator=None) -> (Tensor, Tensor)");
  m.def("ve_ode_step(Tensor x, Tensor score, Tensor t, float dt, float sigma=25.0) -> Tensor");
  m.def(
      "langevin_corrector_step(Tensor x, Tensor score, float snr, Tensor? noise=None, Generator? generator=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor x_t, Tensor eps, Tensor alpha_bar_t, Tensor alpha_bar_prev, float eta=0.0, "
      "Tensor? noise=None, Generator? generator=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmer_ext, CPU, m) {
  mmer_ext::diffusion::register_step_ops<mmer_ext::diffusion::kCpuKernels>(m);
}
