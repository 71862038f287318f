#pragma once
// The sampling-step op family (VE SDE of IMDer, Langevin corrector, DDIM): declarations shared by
// diffusion_steps.cpp, diffusion_steps_cpu.cpp and diffusion_steps_cuda.cu.
//
// The op bodies in diffusion_steps.cpp check arguments, allocate the outputs and describe the work as a StepPlan
// (the affine map of diffusion_steps_math.h plus where its coefficients and noise come from); the per-device
// kernels below carry it out.
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "ops/diffusion_steps/diffusion_steps_math.h"

namespace mmer_ext::diffusion {

// A per-sample parameter (t, alpha_bar, ...) as the kernels see it: a value known on the host (a Python float or a
// 0-d CPU tensor: read here, so nothing syncs with a device), or a 0-d / [B] floating tensor on x's device.
struct ParamArg {
  at::Tensor tensor;  // undefined: use `value`
  double value = 0.0;
};

enum class NoiseSource { kNone, kTensor, kGenerator };

struct StepPlan {
  StepKind kind = StepKind::kPerturb;
  // Contiguous, one dtype and device. score is undefined for ve_perturb, noise unless noise_source == kTensor.
  at::Tensor x, score, noise;
  // Contiguous outputs shaped like x: m and n of diffusion_steps_math.h; undefined when the op does not return it.
  at::Tensor mean, next;
  int64_t inner = 1;  // elements per sample (x.numel() / B)
  ParamArg p0, p1;    // see step_coefficients (p0 unused by kLangevin: the kernels compute the step sizes)
  double log_sigma = 0.0, dt = 0.0, eta = 0.0, snr = 0.0;
  NoiseSource noise_source = NoiseSource::kNone;
  std::optional<at::Generator> generator;  // kGenerator: this one, or the device's default when empty
};

struct DeviceKernels {
  // Every kind but kLangevin: the coefficients depend on p0/p1 only.
  void (*affine_step)(const StepPlan& plan);
  // kLangevin: per-sample step sizes from ||score_b|| and ||z_b|| (same noise in both passes), then the update.
  void (*langevin_step)(const StepPlan& plan);
};

extern const DeviceKernels kCpuKernels;  // diffusion_steps_cpu.cpp

// Op bodies, device-agnostic given the kernels. Argument meanings: mmer_ext/ops/diffusion_steps.py.
at::Tensor ve_marginal_std(const at::Tensor& t, double sigma);
at::Tensor ve_diffusion_coeff(const at::Tensor& t, double sigma);
at::Tensor ve_perturb(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& t, double sigma,
                      const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator);
std::tuple<at::Tensor, at::Tensor> ve_sde_em_step(const DeviceKernels& k, const at::Tensor& x,
                                                  const at::Tensor& score, const at::Tensor& t, double dt,
                                                  double sigma, const std::optional<at::Tensor>& noise,
                                                  const std::optional<at::Generator>& generator);
at::Tensor ve_ode_step(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& score, const at::Tensor& t,
                       double dt, double sigma);
std::tuple<at::Tensor, at::Tensor> langevin_corrector_step(const DeviceKernels& k, const at::Tensor& x,
                                                           const at::Tensor& score, double snr,
                                                           const std::optional<at::Tensor>& noise,
                                                           const std::optional<at::Generator>& generator);
std::tuple<at::Tensor, at::Tensor> ddim_step(const DeviceKernels& k, const at::Tensor& x_t, const at::Tensor& eps,
                                             const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                             double eta, const std::optional<at::Tensor>& noise,
                                             const std::optional<at::Generator>& generator);

// The op bodies bound to one device's kernels, for TORCH_LIBRARY_IMPL blocks.
template <const DeviceKernels& K>
void register_step_ops(torch::Library& m) {
  m.impl("ve_marginal_std", &ve_marginal_std);
  m.impl("ve_diffusion_coeff", &ve_diffusion_coeff);
  m.impl("ve_perturb", +[](const at::Tensor& x, const at::Tensor& t, double sigma,
                           const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator) {
    return ve_perturb(K, x, t, sigma, noise, generator);
  });
  m.impl("ve_sde_em_step",
         +[](const at::Tensor& x, const at::Tensor& score, const at::Tensor& t, double dt, double sigma,
             const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator) {
           return ve_sde_em_step(K, x, score, t, dt, sigma, noise, generator);
         });
  m.impl("ve_ode_step", +[](const at::Tensor& x, const at::Tensor& score, const at::Tensor& t, double dt,
                            double sigma) { return ve_ode_step(K, x, score, t, dt, sigma); });
  m.impl("langevin_corrector_step",
         +[](const at::Tensor& x, const at::Tensor& score, double snr, const std::optional<at::Tensor>& noise,
             const std::optional<at::Generator>& generator) {
           return langevin_corrector_step(K, x, score, snr, noise, generator);
         });
  m.impl("ddim_step", +[](const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& alpha_bar_t,
                          const at::Tensor& alpha_bar_prev, double eta, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Generator>& generator) {
    return ddim_step(K, x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise, generator);
  });
}

}  // namespace mmer_ext::diffusion
