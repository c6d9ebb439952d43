// HyperNorm over a BatchNorm standardizer on the CPU (float32, contiguous NCHW): the statistics, the meta LSTM
// step and the per-sample affine, forward and backward, in two passes over x each way, as BatchNorm's own kernel.
//
// At small batch an eager layer costs its number of operator calls, not its passes over memory; the Python
// paths (hypernorm/nn/fused.py) make about a hundred calls a training step per layer. Here the full-size work is
// four plain loops and the small (N, C) work is ATen calls without Python between them.
// hypernorm/nn/cpu_kernel.py builds this file and wraps it as one autograd node; fused.py documents the math.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Floats are summed in kLanes independent accumulators (the compiler vectorizes them) over blocks of kBlock
// elements, and the blocks in double: the rounding of a sum stays that of kBlock / kLanes additions.
constexpr int64_t kLanes = 8;
constexpr int64_t kBlock = 256;

// sum of a[k] and of a[k] * b[k] over one feature map
inline void sum_and_dot(const float* a, const float* b, int64_t n, double& sum, double& dot) {
  sum = 0;
  dot = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float s[kLanes] = {0}, d[kLanes] = {0};
    int64_t k = start;
    for (; k + kLanes <= end; k += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        s[j] += a[k + j];
        d[j] += a[k + j] * b[k + j];
      }
    }
    float S = 0, D = 0;
    for (; k < end; ++k) {
      S += a[k];
      D += a[k] * b[k];
    }
    for (int64_t j = 0; j < kLanes; ++j) {
      S += s[j];
      D += d[j];
    }
    sum += S;
    dot += D;
  }
}

void check_input(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Per-map sums of x, one pass: the GAP u (N, C) and, with squares, the (double) sums of squares.
Tensor map_sums(const Tensor& x, Tensor* squares) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto u = at::empty({N, C}, x.options());
  if (squares) *squares = at::empty({N, C}, x.options().dtype(at::kDouble));
  const float* xp = x.data_ptr<float>();
  float* up = u.data_ptr<float>();
  double* qp = squares ? squares->data_ptr<double>() : nullptr;
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      double sum, square;
      sum_and_dot(xp + p * HW, xp + p * HW, HW, sum, square);  // the squares cost nothing in a memory-bound pass
      up[p] = static_cast<float>(sum / HW);
      if (qp) qp[p] = square;
    }
  });
  return u;
}

// (u, mean, var, invstd, far): the GAP u, (N, C), and the batch mean, biased variance and 1/sigma of every
// channel, (C,), in one pass over x. far: some channel's mean is farther than far_limit standard deviations from
// zero, where x * scale + bias would cancel; then nothing else happens (the caller takes the shifted path).
// Otherwise running statistics, when given, move as BatchNorm's do: unbiased variance, momentum < 0 for the
// cumulative average (1 / num_batches_tracked).
std::tuple<Tensor, Tensor, Tensor, Tensor, bool> batch_statistics(
    const Tensor& x, double eps, double far_limit, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, double momentum) {
  check_input(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, C, H, W)");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  Tensor squares;
  auto u = map_sums(x, &squares);
  auto mean = at::empty({C}, x.options()), var = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  const float* up = u.data_ptr<float>();
  const double* qp = squares.data_ptr<double>();
  float *mp = mean.data_ptr<float>(), *vp = var.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  const double count = static_cast<double>(N * HW);
  bool far = false;
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, q = 0;
    for (int64_t n = 0; n < N; ++n) {
      s += up[n * C + c];
      q += qp[n * C + c];
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
  return {u, mean, var, invstd, far};
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

// {y, h, c, u, r, s, g, squashed}: y = x * scale + bias with scale = h / sigma, bias = c - h * mean / sigma, where
// (h, c) is the LSTM step from u = GAP(x) and the relayed state (h0, c0).
std::vector<Tensor> forward(const Tensor& x, const OptTensor& u_in, const Tensor& mean, const Tensor& invstd,
                            const OptTensor& h0, const OptTensor& c0, const std::vector<Tensor>& parameters) {
  check_input(x, "x");
  check_input(mean, "mean");
  check_input(invstd, "invstd");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const Tensor u = u_in ? *u_in : map_sums(x, nullptr);
  auto step = cell_forward(u, h0, c0, GateParameters(parameters));
  const Tensor h = step[0].contiguous(), c = step[1].contiguous();
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *cp = c.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t ch = p % C;
      const float scale = hp[p] * ip[ch], bias = cp[p] - mp[ch] * scale;
      const float* row = xp + p * HW;
      float* out = yp + p * HW;
      for (int64_t k = 0; k < HW; ++k) out[k] = row[k] * scale + bias;
    }
  });
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
  const Tensor grad_y = grad_y_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), maps = N * C;
  const float *gp = grad_y.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>(), *hp = h.data_ptr<float>();

  // Pass 1: sum(dy) and sum(dy * (x - mean)) per map, the gradients of bias and scale (scale = h * invstd,
  // bias = c - mean * scale); with those of the next block, dL/dh and dL/dc of the LSTM step.
  std::vector<double> grad_bias(maps), grad_scale(maps);
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      double sum, dot;
      sum_and_dot(gp + p * HW, xp + p * HW, HW, sum, dot);
      grad_bias[p] = sum;
      grad_scale[p] = dot - mp[p % C] * sum;
    }
  });
  auto grad_h = grad_h_next.contiguous().clone(), grad_c = grad_c_next.contiguous().clone();
  float *dhp = grad_h.data_ptr<float>(), *dcp = grad_c.data_ptr<float>();
  std::vector<double> grad_mean(C, 0.0), grad_invstd(C, 0.0);
  for (int64_t p = 0; p < maps; ++p) {  // in a fixed order: the same sums on any number of threads
    const int64_t ch = p % C;
    dhp[p] += static_cast<float>(grad_scale[p] * ip[ch]);
    dcp[p] += static_cast<float>(grad_bias[p]);
    grad_mean[ch] -= grad_bias[p] * hp[p] * ip[ch];
    grad_invstd[ch] += grad_scale[p] * hp[p];
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
  std::vector<float> a(C, 0.0f), b(maps);
  std::vector<double> grad_mean_total(C, 0.0);
  if (batch_stats) {
    for (int64_t c = 0; c < C; ++c) {
      const double i = ip[c], grad_var = grad_invstd[c] * -0.5 * i * i * i;
      grad_mean_total[c] = grad_mean[c] - 2.0 * mp[c] * grad_var;
      a[c] = static_cast<float>(2.0 * grad_var / (static_cast<double>(N) * HW));
    }
  }
  for (int64_t p = 0; p < maps; ++p) b[p] = static_cast<float>((dup[p] + grad_mean_total[p % C] / N) / HW);
  auto grad_x = at::empty_like(x);
  float* dxp = grad_x.data_ptr<float>();
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t ch = p % C;
      const float scale = hp[p] * ip[ch], ac = a[ch], bp = b[p];
      const float *dy = gp + p * HW, *row = xp + p * HW;
      float* out = dxp + p * HW;
      for (int64_t k = 0; k < HW; ++k) out[k] = dy[k] * scale + row[k] * ac + bp;
    }
  });
  grads[0] = grad_x;
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_statistics", &batch_statistics, "GAP and batch statistics of x in one pass");
  m.def("forward", &forward, "HyperNorm (BatchNorm) forward");
  m.def("backward", &backward, "HyperNorm (BatchNorm) backward");
}
