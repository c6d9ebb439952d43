// HyperNorm over a BatchNorm standardizer on the CPU (float32, contiguous NCHW): the statistics, the meta LSTM
// step and the per-sample affine, forward and backward, as one call each way.
//
// At small batch an eager layer costs its number of operator calls from Python, not its passes over memory: the
// Python paths (hypernorm/nn/fused.py) make about a hundred a training step per layer, each a microsecond or more
// of dispatch, and three autograd nodes. Here the full-size passes are the same ATen kernels as there (vectorized
// for the machine by ATen's own dispatch: hand-written loops measured 2-5x slower than them), the small (N, C)
// arithmetic is plain loops, and no Python runs between them. hypernorm/nn/cpu_kernel.py builds this file and
// wraps it as one autograd node; fused.py documents the math.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

void check_input(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

Tensor per_map(const Tensor& t, int64_t N, int64_t C) { return t.view({N, C, 1, 1}); }

// (u, mean, invstd, far): the GAP u, (N, C), and the batch mean and 1/sigma of every channel, (C,). far: some channel's mean is farther than far_limit standard deviations from zero, where
// x * scale + bias would cancel; then nothing else happens (the caller takes the shifted path). Otherwise running
// statistics, when given, move as BatchNorm's do: unbiased variance, momentum < 0 for the cumulative average.
std::tuple<Tensor, Tensor, Tensor, bool> batch_statistics(
    const Tensor& x, double eps, double far_limit, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, double momentum) {
  check_input(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, C, H, W)");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const Tensor u = at::mean(x, {2, 3});
  const Tensor norms = at::linalg_vector_norm(x, 2, at::IntArrayRef({2, 3}));  // sqrt of the sums of squares
  auto mean = at::empty({C}, x.options()), var = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  const float *up = u.data_ptr<float>(), *qp = norms.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *vp = var.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  const double count = static_cast<double>(N * HW);
  bool far = false;
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, q = 0;
    for (int64_t n = 0; n < N; ++n) {
      s += up[n * C + c];
      q += static_cast<double>(qp[n * C + c]) * qp[n * C + c];
    }
    const double m = s / N, v = std::max(q / count - m * m, 0.0), i = 1.0 / std::sqrt(v + eps);
    mp[c] = static_cast<float>(m);
    vp[c] = static_cast<float>(v);
    ip[c] = static_cast<float>(i);
    far = far || std::abs(m * i) > far_limit;
  }
  if (!far && running_mean && running_var) {  // ATen's in-place ops: the buffers' version counters move
    double factor = momentum;
    if (num_batches_tracked) {
      num_batches_tracked->add_(1);
      if (momentum < 0) factor = 1.0 / num_batches_tracked->item<double>();
    }
    running_mean->lerp_(mean, factor);
    running_var->lerp_(var * (count / std::max(count - 1.0, 1.0)), factor);
  }
  return {u, mean, invstd, far};
}

// The two gate maps' parameters, as TrimmedLSTMCell.gate_parameters() gives them: input_map (W0, b0, W1, b1),
// then hidden_map (the same four).
struct GateParameters {
  Tensor w0_in, b0_in, w1_in, b1_in, w0_hid, b0_hid, w1_hid, b1_hid;
  explicit GateParameters(const std::vector<Tensor>& p)
      : w0_in(p.at(0)), b0_in(p.at(1)), w1_in(p.at(2)), b1_in(p.at(3)),
        w0_hid(p.at(4)), b0_hid(p.at(5)), w1_hid(p.at(6)), b1_hid(p.at(7)) {}
};

// The trimmed LSTM step of hypernorm/nn/meta_lstm.py: gates = input_map(u) + hidden_map(h0) as two GEMMs,
// relu([W0_in u + b0_in, W0_hid h0 + b0_hid]) @ [W1_in, W1_hid]^T + b1_in + b1_hid. Returns {h, c, r, s, g, squashed}.
std::vector<Tensor> cell_forward(const Tensor& u, const OptTensor& h0, const OptTensor& c0, const GateParameters& w) {
  const int64_t N = u.size(0), C = u.size(1);
  Tensor z_hid = h0 ? at::addmm(w.b0_hid, *h0, w.w0_hid.t()) : w.b0_hid.expand({N, w.b0_hid.size(0)});
  Tensor r = at::cat({at::addmm(w.b0_in, u, w.w0_in.t()), z_hid}, 1).relu_();
  Tensor gates = at::addmm(w.b1_in + w.b1_hid, r, at::cat({w.w1_in, w.w1_hid}, 1).t());
  Tensor s = gates.sigmoid();  // the g quarter is unused; one kernel over all four beats three slices
  Tensor g = gates.narrow(1, 2 * C, C).tanh();
  Tensor i = s.narrow(1, 0, C), f = s.narrow(1, C, C), o = s.narrow(1, 3 * C, C);
  Tensor c = c0 ? at::addcmul(f * *c0, i, g) : i * g;
  Tensor squashed = c.sigmoid();
  return {o * squashed, c, r, s, g, squashed};
}

// {y, h, c, u, r, s, g, squashed}: y (written; the caller allocates it before any temporary, see backward)
// = x * scale + bias with scale = h / sigma, bias = c - h * mean / sigma, where
// (h, c) is the LSTM step from u = GAP(x) and the relayed state (h0, c0).
std::vector<Tensor> forward(const Tensor& x, const Tensor& y, const OptTensor& u_in, const Tensor& mean,
                            const Tensor& invstd, const OptTensor& h0, const OptTensor& c0,
                            const std::vector<Tensor>& parameters) {
  check_input(x, "x");
  check_input(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes(), "y must have x's shape");
  check_input(mean, "mean");
  check_input(invstd, "invstd");
  const int64_t N = x.size(0), C = x.size(1);
  const Tensor u = u_in ? *u_in : at::mean(x, {2, 3});
  auto step = cell_forward(u, h0, c0, GateParameters(parameters));
  const Tensor h = step[0].contiguous(), c = step[1].contiguous();
  auto scale = at::empty({N, C}, x.options()), bias = at::empty({N, C}, x.options());
  const float *hp = h.data_ptr<float>(), *cp = c.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  float *sp = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  for (int64_t p = 0; p < N * C; ++p) {
    sp[p] = hp[p] * ip[p % C];
    bp[p] = cp[p] - mp[p % C] * sp[p];
  }
  // mul then add_: on CPU a broadcasting addcmul is several times slower than the two
  at::mul_out(const_cast<Tensor&>(y), x, per_map(scale, N, C)).add_(per_map(bias, N, C));
  return {y, h, c, u, step[2], step[3], step[4], step[5]};
}

// {du, dh0, dc0, then the gradients of the eight gate parameters}: _CellStep.backward of meta_lstm.py, with
// the fused weights' gradients split back onto the two maps.
std::vector<Tensor> cell_backward(const Tensor& grad_h, Tensor grad_c, const Tensor& u, const OptTensor& h0,
                                  const OptTensor& c0, const GateParameters& w, const Tensor& r, const Tensor& s,
                                  const Tensor& g, const Tensor& squashed) {
  const int64_t C = u.size(1), hidden = w.w0_in.size(0);
  Tensor i = s.narrow(1, 0, C), f = s.narrow(1, C, C), o = s.narrow(1, 3 * C, C);
  grad_c = at::addcmul(grad_c, at::sigmoid_backward(grad_h, squashed), o);
  Tensor upstream = at::cat({grad_c * g, c0 ? grad_c * *c0 : at::zeros_like(grad_c), grad_c * i, grad_h * squashed}, 1);
  Tensor grad_gates = at::sigmoid_backward(upstream, s);
  grad_gates.narrow(1, 2 * C, C).copy_(at::tanh_backward(upstream.narrow(1, 2 * C, C), g));
  Tensor grad_w1 = at::mm(grad_gates.t(), r);  // (4C, 2 hidden): [W1_in, W1_hid]
  Tensor grad_b1 = grad_gates.sum(0);
  Tensor grad_z = at::threshold_backward(at::mm(grad_gates, at::cat({w.w1_in, w.w1_hid}, 1)), r, 0);
  Tensor grad_z_in = grad_z.narrow(1, 0, hidden), grad_z_hid = grad_z.narrow(1, hidden, hidden);
  return {at::mm(grad_z_in, w.w0_in),
          h0 ? at::mm(grad_z_hid, w.w0_hid) : Tensor(),
          c0 ? grad_c * f : Tensor(),
          at::mm(grad_z_in.t(), u), grad_z_in.sum(0), grad_w1.narrow(1, 0, hidden).contiguous(), grad_b1,
          h0 ? at::mm(grad_z_hid.t(), *h0) : at::zeros_like(w.w0_hid),  // zero, not None, as autograd gives
          grad_z_hid.sum(0),
          grad_w1.narrow(1, hidden, hidden).contiguous(), grad_b1};
}

// {dx, dh0, dc0, then the eight parameters' gradients} of forward() followed by batch_statistics() (batch_stats) or with constant
// mean and invstd (a BatchNorm in eval). Two passes over x: sum(dy) and sum(dy * x) per feature map, then
// dx = dy * scale + x * a + b with a per channel (the variance's gradient) and b per map (the mean's and GAP's).
std::vector<Tensor> backward(const Tensor& grad_y_in, const Tensor& grad_h_next, const Tensor& grad_c_next,
                             const Tensor& x, const Tensor& u, const Tensor& mean, const Tensor& invstd,
                             const OptTensor& h0, const OptTensor& c0, const std::vector<Tensor>& parameters,
                             const Tensor& h, const Tensor& r, const Tensor& s, const Tensor& g,
                             const Tensor& squashed, bool batch_stats, bool need_grad_x) {
  // The full-size result before the small temporaries. Allocated after them, it would land above them at the
  // top of glibc's heap, go back to the system when freed, and fault its pages in again every step.
  Tensor grad_x = need_grad_x ? at::empty_like(x) : Tensor();
  const Tensor grad_y = grad_y_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W, maps = N * C;

  // Pass 1: sum(dy * x) and sum(dy) per map in one pass: BatchNorm's eval backward over N*C channels with mean 0
  // and variance 1 (the gradients of the per-map scale and bias of y = x * scale + bias).
  auto zeros = at::zeros({maps}, x.options()), ones = at::ones({maps}, x.options());
  auto sums = at::native_batch_norm_backward(grad_y.view({1, maps, H, W}), x.view({1, maps, H, W}), c10::nullopt,
                                             zeros, ones, c10::nullopt, c10::nullopt, false, 0.0,
                                             {false, true, true});
  const Tensor dot = std::get<1>(sums).contiguous(), sum = std::get<2>(sums).contiguous();
  const float *dotp = dot.data_ptr<float>(), *sump = sum.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>(), *hp = h.data_ptr<float>();

  // dL/dh and dL/dc of the LSTM step (scale = h * invstd, bias = c - mean * scale), plus the next block's
  auto grad_h = grad_h_next.contiguous().clone(), grad_c = grad_c_next.contiguous().clone();
  float *dhp = grad_h.data_ptr<float>(), *dcp = grad_c.data_ptr<float>();
  std::vector<double> grad_mean(C, 0.0), grad_invstd(C, 0.0);
  for (int64_t p = 0; p < maps; ++p) {
    const int64_t ch = p % C;
    const double grad_scale = static_cast<double>(dotp[p]) - mp[ch] * static_cast<double>(sump[p]);
    dhp[p] += static_cast<float>(grad_scale * ip[ch]);
    dcp[p] += sump[p];
    grad_mean[ch] -= static_cast<double>(sump[p]) * hp[p] * ip[ch];
    grad_invstd[ch] += grad_scale * hp[p];
  }
  auto grads = cell_backward(grad_h, grad_c, u, h0, c0, GateParameters(parameters), r, s, g, squashed);
  if (!need_grad_x) {
    grads[0] = Tensor();
    return grads;
  }

  // Pass 2: dx = dy * scale + x * a + b. a (per channel): through the variance; b (per map): through the GAP
  // and, for batch statistics, the channel mean.
  const Tensor grad_u = grads[0].contiguous();
  const float* dup = grad_u.data_ptr<float>();
  auto scale = at::empty({N, C}, x.options()), a = at::zeros({C}, x.options()), b = at::empty({N, C}, x.options());
  float *sp = scale.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  std::vector<double> grad_mean_total(C, 0.0);
  if (batch_stats) {
    for (int64_t c = 0; c < C; ++c) {
      const double i = ip[c], grad_var = grad_invstd[c] * -0.5 * i * i * i;
      grad_mean_total[c] = grad_mean[c] - 2.0 * mp[c] * grad_var;
      ap[c] = static_cast<float>(2.0 * grad_var / (static_cast<double>(N) * HW));
    }
  }
  for (int64_t p = 0; p < maps; ++p) {
    sp[p] = hp[p] * ip[p % C];
    bp[p] = static_cast<float>((dup[p] + grad_mean_total[p % C] / N) / HW);
  }
  at::mul_out(grad_x, grad_y, per_map(scale, N, C));
  if (batch_stats) grad_x.addcmul_(x, a.view({1, C, 1, 1}));
  grads[0] = grad_x.add_(per_map(b, N, C));
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_statistics", &batch_statistics, "GAP and batch statistics of x, moving running statistics");
  m.def("forward", &forward, "HyperNorm (BatchNorm) forward");
  m.def("backward", &backward, "HyperNorm (BatchNorm) backward");
}
