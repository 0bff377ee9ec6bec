// MLX operations whose exponentials run vectorised on a CPU (built by _platform/cc.py).
//
// MLX's x86 CPU build evaluates exp and sigmoid one element at a time (BENCHMARKS.md), and a
// function it compiles runs uncompiled inside value_and_grad, so a faster exponential has to be
// an operation of its own: a Primitive that MLX schedules, differentiates and frees like its
// own. Each loop here is written so that the compiler vectorises it (-O3 -march=native
// -fno-trapping-math). float32, row-contiguous inputs only: fastops.py checks that before it
// calls in.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace mlx::core;

namespace {

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so that n ln2 is
// exact), a polynomial for exp(r), times 2^n from the exponent bits. Below kLowest the result
// would be subnormal (MLX's exp gives those): it returns 0 there, and -inf gives 0. Outside its
// domain (x > 0, NaN) it returns NaN. The clamp keeps y finite, so the float-to-int conversion
// below is always defined.
constexpr float kLowest = -87.33654f;  // log(FLT_MIN)

inline float exp_nonpositive(float x) {
  const float y = x >= kLowest ? (x <= 0.0f ? x : 0.0f) : kLowest;
  const float n = std::floor(y * 1.44269504088896341f + 0.5f);
  const float r = (y - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x <= 0.0f ? (x >= kLowest ? p * scale : 0.0f) : std::numeric_limits<float>::quiet_NaN();
}

// 1 / (1 + exp(-g)) from exp(-|g|), which cannot overflow.
inline float sigmoid(float g) {
  const float e = exp_nonpositive(-std::fabs(g));
  const float inverse = 1.0f / (1.0f + e);
  return g >= 0.0f ? inverse : e * inverse;
}

void swiglu_rows(const float* gate, const float* x, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = gate[i] * sigmoid(gate[i]) * x[i];
}

// d/dgate of gate * sigmoid(gate) * x is x * s * (1 + gate * (1 - s)); d/dx is gate * s.
void swiglu_grad_rows(const float* gate, const float* x, const float* d, float* d_gate, float* d_x, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float s = sigmoid(gate[i]);
    d_x[i] = d[i] * gate[i] * s;
    d_gate[i] = d[i] * x[i] * s * (1.0f + gate[i] * (1.0f - s));
  }
}

// exp(z - top) row by row, top the row's maximum (so every argument is <= 0).
void exp_shifted_rows(const float* z, const float* top, float* out, size_t rows, size_t width) {
  for (size_t r = 0; r < rows; ++r) {
    const float t = top[r];
    const float* zr = z + r * width;
    float* o = out + r * width;
    for (size_t i = 0; i < width; ++i) o[i] = exp_nonpositive(zr[i] - t);
  }
}

// Allocates the outputs and queues `work` on the primitive's stream, as MLX's own CPU ops do.
template <class F>
void dispatch(Stream stream, const std::vector<array>& in, std::vector<array>& out, F work) {
  for (auto& o : out) o.set_data(allocator::malloc(o.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream);
  for (auto& a : in) encoder.set_input_array(a);
  for (auto& o : out) encoder.set_output_array(o);
  std::vector<array> ins, outs;
  for (auto& a : in) ins.push_back(array::unsafe_weak_copy(a));
  for (auto& o : out) outs.push_back(array::unsafe_weak_copy(o));
  encoder.dispatch([ins = std::move(ins), outs = std::move(outs), work]() mutable { work(ins, outs); });
}

class CpuOnly : public Primitive {
 public:
  using Primitive::Primitive;
  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error(std::string(name()) + ": mlx_dpo's fast operations run on the CPU only");
  }
  bool is_equivalent(const Primitive& other) const override {
    return std::strcmp(name(), other.name()) == 0;
  }
};

class SwiGLUGrad : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;
  const char* name() const override { return "MlxDpoSwiGLUGrad"; }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override { return {in[0].shape(), in[0].shape()}; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    dispatch(stream(), in, out, [](std::vector<array>& i, std::vector<array>& o) {
      swiglu_grad_rows(i[0].data<float>(), i[1].data<float>(), i[2].data<float>(), o[0].data<float>(),
                       o[1].data<float>(), i[0].size());
    });
  }
};

class SwiGLU : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;
  const char* name() const override { return "MlxDpoSwiGLU"; }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override { return {in[0].shape()}; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    dispatch(stream(), in, out, [](std::vector<array>& i, std::vector<array>& o) {
      swiglu_rows(i[0].data<float>(), i[1].data<float>(), o[0].data<float>(), i[0].size());
    });
  }
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>&) override {
    // The kernel reads float32: a custom_function's vjp may hand back another type.
    auto d = contiguous(astype(cotangents[0], float32, stream()), false, stream());
    auto grads = array::make_arrays({primals[0].shape(), primals[0].shape()}, {float32, float32},
                                    std::make_shared<SwiGLUGrad>(stream()), {primals[0], primals[1], d});
    std::vector<array> picked;
    for (int a : argnums) picked.push_back(grads[a]);
    return picked;
  }
};

class ExpShifted : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;
  const char* name() const override { return "MlxDpoExpShifted"; }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override { return {in[0].shape()}; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    dispatch(stream(), in, out, [](std::vector<array>& i, std::vector<array>& o) {
      const size_t width = i[0].shape(-1);
      if (width == 0) return;
      exp_shifted_rows(i[0].data<float>(), i[1].data<float>(), o[0].data<float>(), i[0].size() / width, width);
    });
  }
  // Only forward passes (logps.logsumexp_parts has its own backward) call it.
};

void check(const array& a, const array& b, const char* what) {
  if (a.dtype() != float32 || b.dtype() != float32) throw std::invalid_argument(std::string(what) + ": float32 only");
}

array swiglu(const array& gate, const array& x, StreamOrDevice s) {
  check(gate, x, "swiglu");
  if (gate.shape() != x.shape()) throw std::invalid_argument("swiglu: gate and x differ in shape");
  auto stream = to_stream(s);
  return array(gate.shape(), float32, std::make_shared<SwiGLU>(stream),
               {contiguous(gate, false, stream), contiguous(x, false, stream)});
}

array exp_shifted(const array& z, const array& top, StreamOrDevice s) {
  check(z, top, "exp_shifted");
  if (z.ndim() < 1 || top.shape() != Shape(z.shape().begin(), z.shape().end() - 1))
    throw std::invalid_argument("exp_shifted: top must have one value a row of z (z's shape without its last axis)");
  auto stream = to_stream(s);
  return array(z.shape(), float32, std::make_shared<ExpShifted>(stream),
               {contiguous(z, false, stream), contiguous(top, false, stream)});
}

}  // namespace

NB_MODULE(_mlx_dpo_fastops, m) {
  m.def("swiglu", &swiglu, nb::arg("gate"), nb::arg("x"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "gate * sigmoid(gate) * x, with its gradient.");
  m.def("exp_shifted", &exp_shifted, nb::arg("z"), nb::arg("top"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "exp(z - top[..., None]) for top the maximum of each row of z; no gradient.");
}
