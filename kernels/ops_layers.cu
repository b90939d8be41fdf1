// kernels/ops_layers.cu — the device side of kiln's layer ops (spec in
// kiln/cuda/ops.hpp): linear on cuBLASLt with its bias gradient, layer_norm / rms_norm
// over kernels/norm.cu, the fused cross-entropy's loss reduction, embedding (its backward
// sorted by id with CUB, no atomics), and attention over kernels/attention.cu.
#define KILN_WITH_CUDA 1

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include <cub/device/device_radix_sort.cuh>

#include "kiln/cuda/blas.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"
#include "ops_common.cuh"

namespace kiln::ops::gpu {
using namespace detail;

namespace {

// ---- linear's bias gradient: column sums, a thread per column, rows in order ------------
template <class D>
__global__ void column_sum_kernel(const D* __restrict__ gy, D* __restrict__ gb, std::int64_t rows, std::int64_t cols,
                                  grad_write mode) {
  KILN_GRID_STRIDE(c, cols) {
    float s = 0.0f;
    for (std::int64_t r = 0; r < rows; ++r) s += to_f32(gy[r * cols + c]);
    store(gb[c], s, mode);
  }
}

// ---- cross-entropy: the per-row losses to one value, and the count of counted rows -----
template <class D>
__global__ void loss_reduce_kernel(const float* __restrict__ rows_loss, const std::int64_t* __restrict__ target,
                                   std::int64_t rows, std::int64_t ignore_index, bool mean, D* __restrict__ out,
                                   std::int64_t* __restrict__ count_out) {
  using count_reduce = cub::BlockReduce<long long, block>;
  __shared__ typename count_reduce::TempStorage tmp;
  float s = 0.0f;
  long long c = 0;
  for (std::int64_t r = threadIdx.x; r < rows; r += block)
    if (target[r] != ignore_index) {
      s += rows_loss[r];
      ++c;
    }
  const float total = cuda_kernels::detail::block_sum<block>(s);
  const long long count = count_reduce(tmp).Sum(c);
  if (threadIdx.x == 0) {
    *count_out = count;
    *out = from_f32<D>(mean ? (count ? total / float(count) : 0.0f) : total);
  }
}

// f32 sums into a T gradient, honouring its mode.
template <class D>
__global__ void store_f32_kernel(const float* __restrict__ src, D* __restrict__ dst, std::int64_t n, grad_write mode) {
  KILN_GRID_STRIDE(i, n)
  store(dst[i], src[i], mode);
}

// ---- embedding ---------------------------------------------------------------------------
template <class D, class I>
__global__ void embedding_forward_kernel(const I* __restrict__ ids, const D* __restrict__ w, D* __restrict__ y,
                                         std::int64_t n, std::int64_t vocab, std::int64_t cols,
                                         long long* __restrict__ bad) {
  KILN_GRID_STRIDE(t, n * cols) {
    const std::int64_t r = t / cols, c = t % cols, id = static_cast<std::int64_t>(ids[r]);
    if (id < 0 || id >= vocab) {
      if (c == 0) atomicMin(bad, static_cast<long long>(r));  // the first bad position
      y[t] = from_f32<D>(0.0f);
    } else {
      y[t] = w[id * cols + c];
    }
  }
}
template <class I>
__global__ void embedding_keys_kernel(const I* __restrict__ ids, std::int64_t* __restrict__ keys,
                                      std::int64_t* __restrict__ pos, std::int64_t n) {
  KILN_GRID_STRIDE(i, n) {
    keys[i] = static_cast<std::int64_t>(ids[i]);
    pos[i] = i;
  }
}
// A block per sorted position i; the block that starts a run of equal ids sums the run's
// rows of gy (in position order) into that id's row of gw, its threads across columns.
template <class D>
__global__ void embedding_backward_kernel(const std::int64_t* __restrict__ keys, const std::int64_t* __restrict__ pos,
                                          const D* __restrict__ gy, D* __restrict__ gw, std::int64_t n,
                                          std::int64_t cols) {
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int64_t id = keys[i];
    if (i > 0 && keys[i - 1] == id) continue;
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float s = 0.0f;
      for (std::int64_t j = i; j < n && keys[j] == id; ++j) s += to_f32(gy[pos[j] * cols + c]);
      gw[id * cols + c] = from_f32<D>(to_f32(gw[id * cols + c]) + s);
    }
  }
}

}  // namespace

template <class T>
void norm_forward(const dtensor<T>& x, const T* w, const T* b, double eps, bool rms, dtensor<T>& y,
                  dtensor<float>& stats) {
  const std::int64_t cols = x.shape().back(), rows = x.shape().rows();
  cuda_kernels::norm_forward<T>(x.data(), nullptr, nullptr, w, b, y.data(), stats.data(), stats.data() + rows, rows,
                                cols, static_cast<float>(eps), rms, cuda_runtime::compute_stream());
}

template <class T>
void norm_backward(const dtensor<T>& x, const T* w, const dtensor<T>& gy, const dtensor<float>& stats, bool rms, T* gx,
                   grad_write mx, T* gw, grad_write mw, T* gb, grad_write mb) {
  const std::int64_t cols = x.shape().back(), rows = x.shape().rows();
  dtensor<float> scratch, dw, db;
  if (gw || gb) scratch = dtensor<float>(shape{2 * cuda_kernels::norm_slabs * cols});
  if (gw) dw = dtensor<float>(shape{cols});
  if (gb && !rms) db = dtensor<float>(shape{cols});
  cuda_kernels::norm_backward<T>(x.data(), w, stats.data(), stats.data() + rows, gy.data(), gx,
                                 mx == grad_write::accumulate, gw ? dw.data() : nullptr,
                                 gb && !rms ? db.data() : nullptr, gw || gb ? scratch.data() : nullptr, rows, cols, rms,
                                 cuda_runtime::compute_stream());
  if (gw) store_f32_kernel<<<grid_for(cols, block), block, 0, stream()>>>(dw.data(), dev(gw), cols, mw);
  if (gb && !rms) store_f32_kernel<<<grid_for(cols, block), block, 0, stream()>>>(db.data(), dev(gb), cols, mb);
  check_launch("norm backward (weight gradients)");
}

template <class T>
void linear_forward(const dtensor<T>& x, const dtensor<T>& w, const dtensor<T>* bias, dtensor<T>& y) {
  const std::int64_t in = w.size(1), out = w.size(0), rows = x.shape().rows();
  namespace ck = cuda_kernels;
  ck::gemm_shape s{false, true, rows, out, in, in, in, out};
  ck::gemm<T>(s, x.data(), w.data(), y.data(), grad_write::overwrite, cuda_runtime::compute_stream(),
              ck::gemm_math::f32, bias ? ck::gemm_epilogue::bias : ck::gemm_epilogue::none,
              bias ? bias->data() : nullptr);
}

template <class T>
void linear_backward(const dtensor<T>& x, const dtensor<T>& w, const dtensor<T>& gy, dtensor<T>* gx, grad_write mx,
                     dtensor<T>* gw, grad_write mw, dtensor<T>* gb, grad_write mb) {
  const std::int64_t in = w.size(1), out = w.size(0), rows = x.shape().rows();
  namespace ck = cuda_kernels;
  auto* st = cuda_runtime::compute_stream();
  if (gx) ck::gemm<T>({false, false, rows, in, out, out, in, in}, gy.data(), w.data(), gx->data(), mx, st);
  if (gw) ck::gemm<T>({true, false, out, in, rows, out, in, in}, gy.data(), x.data(), gw->data(), mw, st);
  if (gb) {
    column_sum_kernel<<<grid_for(out, block), block, 0, stream()>>>(dev(gy.data()), dev(gb->data()), rows, out, mb);
    check_launch("linear bias gradient");
  }
}

template <class T>
std::int64_t cross_entropy_forward(const dtensor<T>& logits, const dtensor<std::int64_t>& target,
                                   const cpu::cross_entropy_options& opt, dtensor<T>& loss) {
  const std::int64_t vocab = logits.shape().back(), rows = logits.shape().rows();
  KILN_CHECK(target.numel() == rows, "cross_entropy: ", rows, " rows of logits ", logits.shape().str(), " but ",
             target.numel(), " targets ", target.shape().str());
  dtensor<float> per_row(shape{rows});
  dtensor<std::int64_t> count(shape{1});
  cuda_kernels::cross_entropy<T>(logits.data(), target.data(), per_row.data(), nullptr, 0.0f, rows, vocab,
                                 opt.ignore_index, cuda_runtime::compute_stream(), opt.label_smoothing);
  loss_reduce_kernel<<<1, block, 0, stream()>>>(per_row.data(), target.data(), rows, opt.ignore_index,
                                                opt.reduce == cpu::cross_entropy_options::reduction::mean,
                                                dev(loss.data()), count.data());
  check_launch("cross_entropy loss reduction");
  std::int64_t host_count = 0;
  cuda_runtime::copy(&host_count, count.data(), sizeof host_count, cuda_runtime::copy_kind::device_to_host,
                     cuda_runtime::compute_stream());
  cuda_runtime::synchronize(cuda_runtime::compute_stream());
  return host_count;
}

template <class T>
void cross_entropy_backward(const dtensor<T>& logits, const dtensor<std::int64_t>& target,
                            const cpu::cross_entropy_options& opt, std::int64_t count, const dtensor<T>& gloss,
                            dtensor<T>& gx, grad_write mode) {
  const std::int64_t vocab = logits.shape().back(), rows = logits.shape().rows();
  T g{};
  cuda_runtime::copy(&g, gloss.data(), sizeof g, cuda_runtime::copy_kind::device_to_host,
                     cuda_runtime::compute_stream());
  cuda_runtime::synchronize(cuda_runtime::compute_stream());
  const float gf = static_cast<float>(compute_t<T>(g));
  const bool mean = opt.reduce == cpu::cross_entropy_options::reduction::mean;
  const float grad_scale = mean ? (count ? gf / float(count) : 0.0f) : gf;
  dtensor<float> per_row(shape{rows});
  // The kernel overwrites; an accumulating gradient takes it through a scratch tensor.
  dtensor<T> scratch;
  dtensor<T>& dst = mode == grad_write::overwrite ? gx : (scratch = dtensor<T>(logits.shape()));
  cuda_kernels::cross_entropy<T>(logits.data(), target.data(), per_row.data(), dst.data(), grad_scale, rows, vocab,
                                 opt.ignore_index, cuda_runtime::compute_stream(), opt.label_smoothing);
  if (mode == grad_write::accumulate) scale(scratch, 1.0f, gx, grad_write::accumulate);
}

template <class T, class I>
void embedding_forward(const dtensor<I>& ids, const dtensor<T>& weight, dtensor<T>& y) {
  const std::int64_t n = ids.numel(), vocab = weight.size(0), cols = weight.size(1);
  if (!n || !cols) return;
  constexpr std::int64_t none = std::numeric_limits<std::int64_t>::max();
  dtensor<std::int64_t> bad(shape{1});
  bad.fill(none);
  embedding_forward_kernel<<<grid_for(n * cols, block), block, 0, stream()>>>(
      ids.data(), dev(weight.data()), dev(y.data()), n, vocab, cols, reinterpret_cast<long long*>(bad.data()));
  check_launch("embedding forward");
  std::int64_t first_bad = none;
  cuda_runtime::copy(&first_bad, bad.data(), sizeof first_bad, cuda_runtime::copy_kind::device_to_host,
                     cuda_runtime::compute_stream());
  cuda_runtime::synchronize(cuda_runtime::compute_stream());
  if (first_bad != none) {
    I id{};
    cuda_runtime::copy(&id, ids.data() + first_bad, sizeof id, cuda_runtime::copy_kind::device_to_host,
                       cuda_runtime::compute_stream());
    cuda_runtime::synchronize(cuda_runtime::compute_stream());
    KILN_CHECK(false, "embedding: id ", static_cast<std::int64_t>(id), " at position ", first_bad, " of ids ",
               ids.shape().str(), " is outside the table's ", vocab, " rows");
  }
}

template <class T, class I>
void embedding_backward(const dtensor<I>& ids, const dtensor<T>& gy, dtensor<T>& gw, grad_write mode) {
  const std::int64_t n = ids.numel(), vocab = gw.size(0), cols = gw.size(1);
  if (mode == grad_write::overwrite) gw.fill(T(0));
  if (!n || !cols) return;
  KILN_CHECK(n <= std::numeric_limits<int>::max(), "embedding backward on cuda: ", n,
             " ids exceed CUB's sort limit of 2^31 - 1 per call");
  dtensor<std::int64_t> keys(shape{n}), pos(shape{n}), sorted_keys(shape{n}), sorted_pos(shape{n});
  embedding_keys_kernel<<<grid_for(n, block), block, 0, stream()>>>(ids.data(), keys.data(), pos.data(), n);
  check_launch("embedding backward (keys)");
  // Only the bits that can differ among valid ids take part in the sort.
  int end_bit = 1;
  while (end_bit < 63 && (std::int64_t{1} << end_bit) < vocab) ++end_bit;
  std::size_t temp_bytes = 0;
  cuda_kernels::detail::check(
      cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys.data(), sorted_keys.data(), pos.data(),
                                      sorted_pos.data(), static_cast<int>(n), 0, end_bit, stream()),
      "embedding backward: cub::DeviceRadixSort (size query)");
  dtensor<u8> temp(shape{static_cast<std::int64_t>(std::max<std::size_t>(temp_bytes, 1))});
  cuda_kernels::detail::check(
      cub::DeviceRadixSort::SortPairs(temp.data(), temp_bytes, keys.data(), sorted_keys.data(), pos.data(),
                                      sorted_pos.data(), static_cast<int>(n), 0, end_bit, stream()),
      "embedding backward: cub::DeviceRadixSort");
  embedding_backward_kernel<<<grid_for(n * block, block), block, 0, stream()>>>(
      sorted_keys.data(), sorted_pos.data(), dev(gy.data()), dev(gw.data()), n, cols);
  check_launch("embedding backward");
}

template <class T, class Mask>
void attention_forward(const dtensor<T>& q, const dtensor<T>& k, const dtensor<T>& v, dtensor<T>& o,
                       dtensor<float>& lse, const cuda_kernels::attention_dims& d, Mask mask) {
  cuda_kernels::attention_forward<T, Mask>(q.data(), k.data(), v.data(), o.data(), lse.data(), d,
                                           cuda_runtime::compute_stream(), mask);
}

template <class T, class Mask>
void attention_backward(const dtensor<T>& q, const dtensor<T>& k, const dtensor<T>& v, const dtensor<T>& o,
                        const dtensor<T>& dout, const dtensor<float>& lse, const cuda_kernels::attention_dims& d,
                        dtensor<T>* dq, grad_write mq, dtensor<T>* dk, grad_write mk, dtensor<T>* dv, grad_write mv,
                        Mask mask) {
  if (d.batch * d.q_heads * d.q_len == 0) {  // no queries: dK = dV = 0 (the kernels would not run)
    for (auto [g, m] : {std::pair{dk, mk}, std::pair{dv, mv}})
      if (g && m == grad_write::overwrite) g->fill(T(0));
    return;
  }
  // The kernels write all three; a gradient not wanted lands in scratch.
  dtensor<T> none_q, none_k, none_v;
  mode_target<T> tq(dq ? dq : &(none_q = dtensor<T>(q.shape())), dq ? mq : grad_write::overwrite, q.shape());
  mode_target<T> tk(dk ? dk : &(none_k = dtensor<T>(k.shape())), dk ? mk : grad_write::overwrite, k.shape());
  mode_target<T> tv(dv ? dv : &(none_v = dtensor<T>(v.shape())), dv ? mv : grad_write::overwrite, v.shape());
  dtensor<float> delta(shape{d.batch * d.q_heads * d.q_len});
  cuda_kernels::attention_backward<T, Mask>(q.data(), k.data(), v.data(), o.data(), dout.data(), lse.data(),
                                            delta.data(), tq.ptr(), tk.ptr(), tv.ptr(), d,
                                            cuda_runtime::compute_stream(), mask);
  tq.finish();
  tk.finish();
  tv.finish();
}

// ---- explicit instantiations -------------------------------------------------------------
#define KILN_GPU_MASK(T, M)                                                                                          \
  template void attention_forward<T, M>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, dtensor<T>&,        \
                                        dtensor<float>&, const cuda_kernels::attention_dims&, M);                    \
  template void attention_backward<T, M>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, \
                                         const dtensor<T>&, const dtensor<float>&,                                   \
                                         const cuda_kernels::attention_dims&, dtensor<T>*, grad_write, dtensor<T>*,  \
                                         grad_write, dtensor<T>*, grad_write, M);
#define KILN_GPU_LAYERS(T)                                                                                           \
  template void linear_forward<T>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>*, dtensor<T>&);             \
  template void linear_backward<T>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, dtensor<T>*, grad_write, \
                                   dtensor<T>*, grad_write, dtensor<T>*, grad_write);                                \
  template void norm_forward<T>(const dtensor<T>&, const T*, const T*, double, bool, dtensor<T>&, dtensor<float>&);  \
  template void norm_backward<T>(const dtensor<T>&, const T*, const dtensor<T>&, const dtensor<float>&, bool, T*,    \
                                 grad_write, T*, grad_write, T*, grad_write);                                        \
  template std::int64_t cross_entropy_forward<T>(const dtensor<T>&, const dtensor<std::int64_t>&,                    \
                                                 const cpu::cross_entropy_options&, dtensor<T>&);                    \
  template void cross_entropy_backward<T>(const dtensor<T>&, const dtensor<std::int64_t>&,                           \
                                          const cpu::cross_entropy_options&, std::int64_t, const dtensor<T>&,        \
                                          dtensor<T>&, grad_write);                                                  \
  template void embedding_forward<T, i64>(const dtensor<i64>&, const dtensor<T>&, dtensor<T>&);                      \
  template void embedding_forward<T, i32>(const dtensor<i32>&, const dtensor<T>&, dtensor<T>&);                      \
  template void embedding_backward<T, i64>(const dtensor<i64>&, const dtensor<T>&, dtensor<T>&, grad_write);         \
  template void embedding_backward<T, i32>(const dtensor<i32>&, const dtensor<T>&, dtensor<T>&, grad_write);         \
  KILN_GPU_MASK(T, ops::mask::none)                                                                                  \
  KILN_GPU_MASK(T, ops::mask::causal)                                                                                \
  KILN_GPU_MASK(T, ops::mask::local_n)                                                                               \
  KILN_GPU_MASK(T, ops::mask::strided_n)
KILN_GPU_LAYERS(f32)
KILN_GPU_LAYERS(bf16)
KILN_GPU_LAYERS(f16)

}  // namespace kiln::ops::gpu
