// HyperNorm over a BatchNorm standardizer on the CPU (float32, contiguous NCHW): the statistics, the meta LSTM
// step and the per-sample affine, forward and backward, as one call each way.
//
// At small batch an eager layer costs its number of operator calls, not its passes over memory: the Python paths
// (hypernorm/nn/fused.py) make about a hundred a training step per layer, each a microsecond or more of dispatch.
// The forward here is loops over ATen's own vector type (at::vec::Vectorized, built for the machine's instruction
// set: cpu_kernel.py compiles one build per torch CPU capability) with ATen's GEMM only where the LSTM is large;
// so are the backward's two full-size passes (the LSTM step's backward is ATen's operators). cpu_kernel.py builds
// this file and wraps it as one autograd node; fused.py documents the math.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Below this many multiply-adds an LSTM GEMM runs as the loops here: ATen's GEMM costs microseconds to dispatch.
constexpr int64_t kSmallGemm = int64_t{1} << 18;

void check_input(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

float lane_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// at::parallel_for's grain over feature maps of `len` floats: ATen's own grain in elements.
int64_t maps_per_task(int64_t len) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(len, 1));
}

// sums[m] = sum(x) and, with dots, dots[m] = sum(x * w) over each of `maps` contiguous runs of `len` floats: the
// forward's sums and sums of squares (w = x), the backward's sum(dy) and sum(dy * x).
template <bool with_dots>
void map_sums(const float* x, const float* w, int64_t maps, int64_t len, float* sums, float* dots) {
  at::parallel_for(0, maps, maps_per_task(len), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float *p = x + m * len, *q = with_dots ? w + m * len : nullptr;
      Vec s0(0), s1(0), d0(0), d1(0);  // two accumulators each: an add's latency, not its throughput, bounds one
      int64_t i = 0;
      for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        const Vec a = Vec::loadu(p + i), b = Vec::loadu(p + i + kLanes);
        s0 = s0 + a;
        s1 = s1 + b;
        if (with_dots) {
          d0 = at::vec::fmadd(a, Vec::loadu(q + i), d0);
          d1 = at::vec::fmadd(b, Vec::loadu(q + i + kLanes), d1);
        }
      }
      for (; i < len; i += kLanes) {  // loadu with a count fills the lanes past it with zeros
        const int64_t count = std::min(kLanes, len - i);
        const Vec a = Vec::loadu(p + i, count);
        s0 = s0 + a;
        if (with_dots) d0 = at::vec::fmadd(a, Vec::loadu(q + i, count), d0);
      }
      sums[m] = lane_sum(s0 + s1);
      if (with_dots) dots[m] = lane_sum(d0 + d1);
    }
  });
}

// y = x * scale + bias per map, scale and bias (N * C).
void affine(const float* x, const float* scale, const float* bias, int64_t maps, int64_t len, float* y) {
  at::parallel_for(0, maps, maps_per_task(len), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const Vec a(scale[m]), b(bias[m]);
      const float* p = x + m * len;
      float* q = y + m * len;
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) at::vec::fmadd(Vec::loadu(p + i), a, b).store(q + i);
      if (i < len) at::vec::fmadd(Vec::loadu(p + i, len - i), a, b).store(q + i, len - i);
    }
  });
}

// dx = dy * scale + x * a + b per map: scale and b (N * C), a (C) per channel, or no x term where a is null.
void input_gradient(const float* dy, const float* x, const float* scale, const float* a, const float* b, int64_t N,
                    int64_t C, int64_t len, float* dx) {
  if (a == nullptr) return affine(dy, scale, b, N * C, len, dx);
  at::parallel_for(0, N * C, maps_per_task(len), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const Vec s(scale[m]), av(a[m % C]), bv(b[m]);
      const float *p = dy + m * len, *q = x + m * len;
      float* out = dx + m * len;
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        at::vec::fmadd(Vec::loadu(p + i), s, at::vec::fmadd(Vec::loadu(q + i), av, bv)).store(out + i);
      }
      if (i < len) {
        const int64_t count = len - i;
        at::vec::fmadd(Vec::loadu(p + i, count), s, at::vec::fmadd(Vec::loadu(q + i, count), av, bv))
            .store(out + i, count);
      }
    }
  });
}

// The forward's small tensors carved from one allocation (they share its storage): one malloc a layer instead of a
// dozen. Or carved from a Scratch's memory, for tensors that do not outlive the call.
class Arena {
 public:
  Arena() = default;
  Arena(int64_t numel, const at::TensorOptions& options) : buffer_(at::empty({numel}, options)) {}
  Arena(float* memory, int64_t numel, const at::TensorOptions& options)
      : buffer_(at::from_blob(memory, {numel}, options)) {}
  // A tensor on a fresh stretch of the buffer's storage, made directly: narrow and view would cost a microsecond
  // each in dispatch and autograd's view tracking, for disjoint stretches that nothing differentiates.
  Tensor take(at::IntArrayRef shape) {
    const int64_t numel = c10::multiply_integers(shape);
    TORCH_CHECK(used_ + numel <= buffer_.numel(), "arena overrun");
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(buffer_.storage()), buffer_.key_set(),
                                                     buffer_.dtype());
    impl->set_storage_offset(used_);
    impl->set_sizes_contiguous(shape);
    used_ += numel;
    return Tensor(std::move(impl));
  }

 private:
  Tensor buffer_;
  int64_t used_ = 0;
};

// Room for one call's temporaries, kept per thread from call to call: no allocation, and none kept alive by the
// tensors saved for backward.
class Scratch {
 public:
  explicit Scratch(int64_t numel) {
    thread_local std::vector<float> space;
    if (static_cast<int64_t>(space.size()) < numel) space.resize(numel);
    next_ = space.data();
    end_ = next_ + numel;
  }
  float* take(int64_t numel) {
    TORCH_CHECK(next_ + numel <= end_, "scratch overrun");
    float* p = next_;
    next_ += numel;
    return p;
  }

 private:
  float *next_, *end_;
};

// The two gate maps' parameters, as TrimmedLSTMCell.gate_parameters() gives them: input_map (W0, b0, W1, b1),
// then hidden_map (the same four).
struct GateParameters {
  Tensor w0_in, b0_in, w1_in, b1_in, w0_hid, b0_hid, w1_hid, b1_hid;
  explicit GateParameters(const std::vector<Tensor>& p)
      : w0_in(p.at(0)), b0_in(p.at(1)), w1_in(p.at(2)), b1_in(p.at(3)),
        w0_hid(p.at(4)), b0_hid(p.at(5)), w1_hid(p.at(6)), b1_hid(p.at(7)) {
    for (const Tensor& t : p) check_input(t, "an LSTM parameter");
  }
};

// out[n, j] = relu(b[j] + W[j, :] . in[n, :]) for W (M, K), in (N, K); out rows `stride` apart. in null: zeros.
void small_bottleneck(const float* in, const Tensor& weight, const Tensor& bias, int64_t N, float* out,
                      int64_t stride) {
  const int64_t M = weight.size(0), K = weight.size(1);
  const float *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < M; ++j) {
      float z = b[j];
      if (in != nullptr) {
        const float *row = w + j * K, *v = in + n * K;
        Vec acc(0);
        int64_t k = 0;
        for (; k + kLanes <= K; k += kLanes) acc = at::vec::fmadd(Vec::loadu(row + k), Vec::loadu(v + k), acc);
        if (k < K) acc = at::vec::fmadd(Vec::loadu(row + k, K - k), Vec::loadu(v + k, K - k), acc);
        z += lane_sum(acc);
      }
      out[n * stride + j] = std::max(z, 0.0f);
    }
  }
}

// The gate maps' output layers in the layout the gates' GEMM reads, (2 hidden + 1, 4C): [W1_in, W1_hid]^T, then
// b1_in + b1_hid. A stage's layers share one LSTM, so the caller builds this once per stage and pass.
Tensor output_weights(const std::vector<Tensor>& parameters) {
  at::NoGradGuard no_grad;
  const GateParameters w(parameters);
  const int64_t G = w.w1_in.size(0), hidden = w.w1_in.size(1);
  Tensor out = at::empty({2 * hidden + 1, G}, w.w1_in.options());
  float* o = out.data_ptr<float>();
  const float *w_in = w.w1_in.data_ptr<float>(), *w_hid = w.w1_hid.data_ptr<float>();
  const float *b_in = w.b1_in.data_ptr<float>(), *b_hid = w.b1_hid.data_ptr<float>();
  for (int64_t k = 0; k < hidden; ++k) {  // rows of the transpose in turn: strided stores would thrash the cache
    float *row_in = o + k * G, *row_hid = o + (hidden + k) * G;
    for (int64_t j = 0; j < G; ++j) {
      row_in[j] = w_in[j * hidden + k];
      row_hid[j] = w_hid[j * hidden + k];
    }
  }
  for (int64_t j = 0; j < G; ++j) o[2 * hidden * G + j] = b_in[j] + b_hid[j];
  return out;
}

// gates (N, 4C) = b1_in + b1_hid + r[:, :hidden] W1_in^T + r[:, hidden:] W1_hid^T, as rows of axpys over 4C, from
// output_weights()'s layout.
void small_gates(const float* r, const Tensor& weights, int64_t N, float* gates) {
  const int64_t G = weights.size(1), rows = weights.size(0) - 1;
  const float *w = weights.data_ptr<float>(), *bias = w + rows * G;
  for (int64_t n = 0; n < N; ++n) {
    float* out = gates + n * G;
    std::copy(bias, bias + G, out);
    for (int64_t k = 0; k < rows; ++k) {
      const float weight_of_row = r[n * rows + k];
      if (weight_of_row == 0.0f) continue;  // a ReLU zero: about half of them
      const Vec a(weight_of_row);
      const float* row = w + k * G;
      int64_t j = 0;
      for (; j + kLanes <= G; j += kLanes) at::vec::fmadd(a, Vec::loadu(row + j), Vec::loadu(out + j)).store(out + j);
      if (j < G) at::vec::fmadd(a, Vec::loadu(row + j, G - j), Vec::loadu(out + j, G - j)).store(out + j, G - j);
    }
  }
}

Vec sigmoid(const Vec& v) { return (Vec(1.0f) + v.neg().exp()).reciprocal(); }

// The trimmed LSTM step of hypernorm/nn/meta_lstm.py: gates = input_map(u) + hidden_map(h0), i, f, o = sigmoid,
// g = tanh, c = f * c0 + i * g, h = o * sigmoid(c). Returns {h, c, r, s, g, squashed}: r = the bottleneck's
// activations [relu(W0_in u + b0_in), relu(W0_hid h0 + b0_hid)], s = sigmoid(gates) (its g quarter is not
// computed: zeros), g = tanh of the g quarter, squashed = sigmoid(c).
// h and c come from `results`, what the backward needs (r, s, g, squashed: cell_saved_numel) from `saved`, the gates
// from `scratch` (cell_scratch_numel).
bool small_cell(int64_t N, int64_t C, int64_t hidden) { return N * 4 * C * 2 * hidden <= kSmallGemm; }

int64_t cell_saved_numel(int64_t N, int64_t C, int64_t hidden) { return N * 2 * hidden + N * 4 * C + 2 * N * C; }

int64_t cell_scratch_numel(int64_t N, int64_t C) { return N * 4 * C; }

std::vector<Tensor> cell_forward(const Tensor& u, const OptTensor& h0, const OptTensor& c0, const GateParameters& w,
                                 const Tensor& out_weights, Arena& results, Arena& saved, Scratch& scratch) {
  const int64_t N = u.size(0), C = u.size(1), hidden = w.w0_in.size(0);
  Tensor r = saved.take({N, 2 * hidden});
  float* gp = scratch.take(N * 4 * C);
  if (small_cell(N, C, hidden)) {
    small_bottleneck(u.data_ptr<float>(), w.w0_in, w.b0_in, N, r.data_ptr<float>(), 2 * hidden);
    small_bottleneck(h0 ? h0->data_ptr<float>() : nullptr, w.w0_hid, w.b0_hid, N, r.data_ptr<float>() + hidden,
                     2 * hidden);
    small_gates(r.data_ptr<float>(), out_weights, N, gp);
  } else {  // ATen's GEMM
    Tensor r_in = r.narrow(1, 0, hidden), r_hid = r.narrow(1, hidden, hidden);
    at::addmm_out(r_in, w.b0_in, u, w.w0_in.t());
    if (h0) {
      at::addmm_out(r_hid, w.b0_hid, *h0, w.w0_hid.t());
    } else {
      r_hid.copy_(w.b0_hid.expand({N, hidden}));
    }
    r.relu_();
    Tensor gates = at::from_blob(gp, {N, 4 * C}, u.options());
    at::addmm_out(gates, out_weights[2 * hidden], r, out_weights.narrow(0, 0, 2 * hidden));
  }
  Tensor s = saved.take({N, 4 * C}), g = saved.take({N, C}), squashed = saved.take({N, C}), c = results.take({N, C}),
         h = results.take({N, C});
  const float* c0p = c0 ? c0->data_ptr<float>() : nullptr;
  float *sp = s.data_ptr<float>(), *g_out = g.data_ptr<float>(), *cp = c.data_ptr<float>(),
        *qp = squashed.data_ptr<float>(), *hp = h.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float* row = gp + n * 4 * C;
    float* s_row = sp + n * 4 * C;
    for (int64_t j = 0; j < C; j += kLanes) {
      const int64_t count = std::min(kLanes, C - j), at = n * C + j;
      const Vec i = sigmoid(Vec::loadu(row + j, count)), f = sigmoid(Vec::loadu(row + C + j, count)),
                gate = Vec::loadu(row + 2 * C + j, count).tanh(), o = sigmoid(Vec::loadu(row + 3 * C + j, count));
      const Vec cell = c0p ? at::vec::fmadd(f, Vec::loadu(c0p + at, count), i * gate) : i * gate;
      const Vec squash = sigmoid(cell);
      i.store(s_row + j, count);
      f.store(s_row + C + j, count);
      Vec(0.0f).store(s_row + 2 * C + j, count);
      o.store(s_row + 3 * C + j, count);
      gate.store(g_out + at, count);
      cell.store(cp + at, count);
      squash.store(qp + at, count);
      (o * squash).store(hp + at, count);
    }
  }
  return {h, c, r, s, g, squashed};
}

// {y, h, c}, and with for_backward {u, mean, invstd, r, s, g, squashed} after them; or nothing where some channel's
// mean is farther than far_limit standard deviations from zero (x * scale + bias would cancel; the caller takes the
// shifted path), before any state changes. y = x * scale + bias with scale = h / sigma, bias = c - h * mean / sigma,
// where (h, c) is the LSTM step from u = GAP(x) and the relayed (h0, c0); out_weights = output_weights(parameters).
// batch_stats: mean and sigma of the batch; running statistics, when given, then move as BatchNorm's do (unbiased
// variance; momentum < 0: the cumulative average). Otherwise (a BatchNorm in eval) they are running_mean and
// running_var's.
std::vector<Tensor> forward(const Tensor& x, bool batch_stats, double eps, double far_limit,
                            const OptTensor& running_mean, const OptTensor& running_var,
                            const OptTensor& num_batches_tracked, double momentum, const OptTensor& h0,
                            const OptTensor& c0, const std::vector<Tensor>& parameters, const Tensor& out_weights,
                            bool for_backward) {
  at::NoGradGuard no_grad;  // one autograd node (cpu_kernel._Layer) stands for all of this
  check_input(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, C, H, W)");
  const GateParameters w(parameters);
  // The full-size output before the small temporaries. Allocated after them, it would land above them at the top
  // of glibc's heap, go back to the system when freed, and fault its pages in again every step.
  Tensor y = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), maps = N * C;
  const auto options = x.options();
  const int64_t hidden = w.w0_in.size(0);
  if (h0) check_input(*h0, "h0");  // every check before the running statistics move
  if (c0) check_input(*c0, "c0");
  check_input(out_weights, "out_weights");
  TORCH_CHECK(out_weights.dim() == 2 && out_weights.size(0) == 2 * hidden + 1 && out_weights.size(1) == 4 * C,
              "out_weights must be output_weights(parameters)");
  // What the call returns lives in `results`: (h, c), and for the backward what it needs. Otherwise (eval) those
  // are temporaries in the per-thread scratch, and the layer allocates what BN does (y) and the small (h, c).
  const int64_t saved_numel = N * C + 2 * C + cell_saved_numel(N, C, hidden), kept = for_backward ? saved_numel : 0;
  Arena results(2 * N * C + kept, options);
  Scratch scratch((batch_stats ? 3 : 2) * maps + C + cell_scratch_numel(N, C) + saved_numel - kept);
  Arena in_scratch = for_backward ? Arena() : Arena(scratch.take(saved_numel), saved_numel, options);
  Arena& saved = for_backward ? results : in_scratch;
  float *scale = scratch.take(maps), *bias = scratch.take(maps);
  Tensor u = saved.take({N, C}), mean = saved.take({C}), invstd = saved.take({C});
  float *up = u.data_ptr<float>(), *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  bool far = false;
  if (batch_stats) {
    float *squares = scratch.take(maps), *var = scratch.take(C);
    map_sums<true>(x.data_ptr<float>(), x.data_ptr<float>(), maps, HW, up, squares);
    const double count = static_cast<double>(N * HW);
    for (int64_t c = 0; c < C; ++c) {
      double s = 0, q = 0;
      for (int64_t n = 0; n < N; ++n) {
        s += up[n * C + c];
        q += squares[n * C + c];
      }
      const double m = s / count, v = std::max(q / count - m * m, 0.0), i = 1.0 / std::sqrt(v + eps);
      mp[c] = static_cast<float>(m);
      var[c] = static_cast<float>(v * (count / std::max(count - 1.0, 1.0)));
      ip[c] = static_cast<float>(i);
      far = far || std::abs(m * i) > far_limit;
    }
    if (far) return {};
    if (running_mean && running_var) {  // ATen's in-place ops: the buffers' version counters move
      double factor = momentum;
      if (num_batches_tracked) {
        num_batches_tracked->add_(1);
        if (momentum < 0) factor = 1.0 / num_batches_tracked->item<double>();
      }
      running_mean->lerp_(mean, factor);
      running_var->lerp_(at::from_blob(var, {C}, options), factor);
    }
  } else {
    TORCH_CHECK(running_mean && running_var, "statistics of a BatchNorm in eval need its running buffers");
    check_input(*running_mean, "running_mean");
    check_input(*running_var, "running_var");
    const float *rm = running_mean->data_ptr<float>(), *rv = running_var->data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      const double i = 1.0 / std::sqrt(static_cast<double>(rv[c]) + eps);
      mp[c] = rm[c];
      ip[c] = static_cast<float>(i);
      far = far || std::abs(rm[c] * i) > far_limit;
    }
    if (far) return {};
    map_sums<false>(x.data_ptr<float>(), nullptr, maps, HW, up, nullptr);
  }
  const float inverse_hw = 1.0f / static_cast<float>(HW);
  for (int64_t p = 0; p < maps; ++p) up[p] *= inverse_hw;
  auto step = cell_forward(u, h0, c0, w, out_weights, results, saved, scratch);
  const float *hp = step[0].data_ptr<float>(), *cp = step[1].data_ptr<float>();
  for (int64_t n = 0, p = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c, ++p) {
      scale[p] = hp[p] * ip[c];
      bias[p] = cp[p] - mp[c] * scale[p];
    }
  }
  affine(x.data_ptr<float>(), scale, bias, maps, HW, y.data_ptr<float>());
  if (!for_backward) return {y, step[0], step[1]};
  return {y, step[0], step[1], u, mean, invstd, step[2], step[3], step[4], step[5]};
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

// {dx, dh0, dc0, then the eight parameters' gradients} of forward(), with the batch's statistics (batch_stats) or
// constant mean and invstd (a BatchNorm in eval). Two passes over x: sum(dy) and sum(dy * x) per feature map, then
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

  // Pass 1: sum(dy * x) and sum(dy) per map (the gradients of the per-map scale and bias of y = x * scale + bias).
  Scratch scratch(4 * maps + C);
  float *dotp = scratch.take(maps), *sump = scratch.take(maps);
  map_sums<true>(grad_y.data_ptr<float>(), x.data_ptr<float>(), maps, HW, sump, dotp);
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
  float *sp = scratch.take(maps), *bp = scratch.take(maps), *ap = batch_stats ? scratch.take(C) : nullptr;
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
  input_gradient(grad_y.data_ptr<float>(), x.data_ptr<float>(), sp, ap, bp, N, C, HW, grad_x.data_ptr<float>());
  grads[0] = grad_x;
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("output_weights", &output_weights, "The LSTM's output layers as the forward reads them");
  m.def("forward", &forward, "HyperNorm (BatchNorm) forward");
  m.def("backward", &backward, "HyperNorm (BatchNorm) backward");
}
