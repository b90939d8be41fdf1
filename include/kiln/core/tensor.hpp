// kiln/core/tensor.hpp — a typed, device-tagged, strided view over shared storage.
//
// Spec: tensor<T, Dev> holds a reference-counted block from caching_allocator<Dev>,
// an element offset, a shape and strides (in elements). Copying a tensor copies the
// handle, never the data (use clone()). View operations — reshape of a contiguous
// tensor, transpose, permute, slice, select, unsqueeze — share storage; contiguous()
// copies only when the layout requires it. Element access by index is a host-side
// convenience for tests and small code; kernels use data() on contiguous tensors.
#pragma once

#include <cstring>
#include <memory>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "kiln/core/allocator.hpp"
#include "kiln/core/device.hpp"
#include "kiln/core/dtype.hpp"
#include "kiln/core/error.hpp"
#include "kiln/core/shape.hpp"

namespace kiln {

template <device Dev>
struct storage_block {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  explicit storage_block(std::size_t n) : ptr(n ? caching_allocator<Dev>::instance().allocate(n) : nullptr), bytes(n) {}
  ~storage_block() { caching_allocator<Dev>::instance().deallocate(ptr); }
  // Frees the memory but keeps the block (and every view of it) alive: ZeRO-3 releases a
  // gathered parameter after use while the autograd nodes that captured it still hold the
  // handle, and restore() brings the memory back (uninitialised) before it is refilled —
  // PyTorch FSDP's storage resize-to-zero. data() of a released block is null.
  void release() {
    caching_allocator<Dev>::instance().deallocate(ptr);
    ptr = nullptr;
  }
  void restore() {
    if (!ptr && bytes) ptr = caching_allocator<Dev>::instance().allocate(bytes);
  }
  bool resident() const { return ptr != nullptr || bytes == 0; }
  storage_block(const storage_block&) = delete;
  storage_block& operator=(const storage_block&) = delete;
};

template <element T, device Dev = cpu>
class tensor {
 public:
  using value_type = T;
  using device_type = Dev;

  tensor() = default;
  // Uninitialised tensor of the given shape.
  explicit tensor(const shape& s)
      : storage_(std::make_shared<storage_block<Dev>>(static_cast<std::size_t>(s.numel()) * sizeof(T))),
        shape_(s),
        strides_(s.contiguous_strides()) {
    for (auto d : s) KILN_CHECK(d >= 0, "tensor: negative dimension in shape ", s.str());
  }

  static tensor empty(const shape& s) { return tensor(s); }
  static tensor zeros(const shape& s) { return full(s, T(0)); }
  static tensor ones(const shape& s) { return full(s, T(1)); }
  static tensor full(const shape& s, T v) {
    tensor t(s);
    t.fill(v);
    return t;
  }
  static tensor from(const shape& s, std::span<const T> values) {
    KILN_CHECK(static_cast<std::int64_t>(values.size()) == s.numel(), "tensor::from: ", values.size(),
               " values given for shape ", s.str(), " (", s.numel(), " elements)");
    static_assert(Dev::is_host, "tensor::from fills host memory; build a cpu tensor and copy it to the device");
    tensor t(s);
    if (!values.empty()) std::memcpy(t.data(), values.data(), values.size() * sizeof(T));
    return t;
  }
  static tensor from(const shape& s, std::initializer_list<T> values) {
    return from(s, std::span<const T>(values.begin(), values.size()));
  }

  // --- metadata -------------------------------------------------------------------
  const kiln::shape& shape() const { return shape_; }
  const kiln::strides& strides() const { return strides_; }
  int rank() const { return shape_.rank(); }
  std::int64_t size(int dim) const { return shape_.at(dim); }
  std::int64_t numel() const { return shape_.numel(); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * sizeof(T); }
  bool defined() const { return storage_ != nullptr; }
  explicit operator bool() const { return defined(); }
  std::int64_t offset() const { return offset_; }
  bool is_contiguous() const {
    std::int64_t expect = 1;
    for (int i = rank() - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[i] != expect) return false;
      expect *= shape_[i];
    }
    return true;
  }
  // True when both handles view the same storage block.
  bool shares_storage_with(const tensor& o) const { return storage_ == o.storage_; }
  long use_count() const { return storage_.use_count(); }
  // The storage block's memory (see storage_block::release); shared by every view.
  void release_storage() {
    if (storage_) storage_->release();
  }
  void restore_storage() {
    if (storage_) storage_->restore();
  }
  bool storage_resident() const { return !storage_ || storage_->resident(); }
  std::size_t storage_bytes() const { return storage_ ? storage_->bytes : 0; }

  T* data() { return storage_ ? static_cast<T*>(storage_->ptr) + offset_ : nullptr; }
  const T* data() const { return storage_ ? static_cast<const T*>(storage_->ptr) + offset_ : nullptr; }
  std::span<T> span() {
    require_contiguous("span");
    return {data(), static_cast<std::size_t>(numel())};
  }
  std::span<const T> span() const {
    require_contiguous("span");
    return {data(), static_cast<std::size_t>(numel())};
  }

  // --- element access (host only) --------------------------------------------------
  template <class... I>
  T& operator()(I... idx) {
    static_assert(Dev::is_host, "element access needs a host tensor");
    return data()[element_offset(idx...)];
  }
  template <class... I>
  const T& operator()(I... idx) const {
    static_assert(Dev::is_host, "element access needs a host tensor");
    return data()[element_offset(idx...)];
  }
  // Element by flat row-major index, whatever the strides.
  T& flat(std::int64_t i) {
    static_assert(Dev::is_host, "tensor::flat reads host memory; copy a device tensor with kiln::to_host first");
    return data()[flat_offset(i)];
  }
  const T& flat(std::int64_t i) const {
    static_assert(Dev::is_host, "tensor::flat reads host memory; copy a device tensor with kiln::to_host first");
    return data()[flat_offset(i)];
  }

  std::vector<T> to_vector() const {
    static_assert(Dev::is_host, "tensor::to_vector reads host memory; copy a device tensor with kiln::to_host first");
    std::vector<T> v(static_cast<std::size_t>(numel()));
    if (is_contiguous()) {
      if (!v.empty()) std::memcpy(v.data(), data(), v.size() * sizeof(T));
    } else {
      for (std::int64_t i = 0; i < numel(); ++i) v[static_cast<std::size_t>(i)] = flat(i);
    }
    return v;
  }

  // --- whole-tensor operations -----------------------------------------------------
  tensor& fill(T v) {
    if constexpr (!Dev::is_host) {
      KILN_CHECK(is_contiguous(), "fill: a strided ", Dev::name, " tensor ", shape_.str(),
                 " (device fills write contiguous tensors; fill a contiguous one and take the view)");
      if (numel()) detail::raw_memory<Dev>::fill(data(), static_cast<std::size_t>(numel()), sizeof(T), &v);
      return *this;
    } else if (is_contiguous()) {
      std::fill_n(data(), numel(), v);
    } else {
      for (std::int64_t i = 0; i < numel(); ++i) flat(i) = v;
    }
    return *this;
  }
  tensor clone() const {
    tensor t(shape_);
    t.copy_from(*this);
    return t;
  }
  tensor contiguous() const { return is_contiguous() ? *this : clone(); }
  // Copies values (same shape required) into this tensor's storage.
  tensor& copy_from(const tensor& src) {
    KILN_CHECK(src.shape() == shape_, "copy_from: shape ", src.shape().str(), " does not match destination ",
               shape_.str());
    if constexpr (!Dev::is_host) {
      if (!numel()) return *this;
      if (is_contiguous() && src.is_contiguous()) {
        detail::raw_memory<Dev>::copy(data(), src.data(), nbytes());
      } else {
        KILN_CHECK(rank() <= 8, "copy_from: a strided ", Dev::name, " tensor ", shape_.str(), " has rank ", rank(),
                   "; device copies take at most 8 dimensions");
        detail::raw_memory<Dev>::copy_strided(data(), strides_.begin(), src.data(), src.strides().begin(),
                                              shape_.begin(), rank(), sizeof(T));
      }
    } else if (is_contiguous() && src.is_contiguous()) {
      if (numel()) std::memmove(data(), src.data(), nbytes());
    } else {
      for (std::int64_t i = 0; i < numel(); ++i) flat(i) = src.flat(i);
    }
    return *this;
  }
  template <element U>
  tensor<U, Dev> to() const {
    if constexpr (!Dev::is_host) {  // floating types only: a conversion kernel
      const tensor src = contiguous();
      tensor<U, Dev> out(shape_);
      if (numel())
        detail::raw_memory<Dev>::convert(out.data(), dtype_of<U>, src.data(), dtype_of<T>,
                                         static_cast<std::size_t>(numel()));
      return out;
    } else {
      tensor<U, Dev> out(shape_);
      U* o = out.data();
      for (std::int64_t i = 0; i < numel(); ++i) o[i] = static_cast<U>(static_cast<compute_t<T>>(flat(i)));
      return out;
    }
  }

  // --- views -----------------------------------------------------------------------
  // Reshape: a view when contiguous, a copy otherwise. One dimension may be -1.
  tensor reshape(kiln::shape s) const {
    std::int64_t known = 1;
    int infer = -1;
    for (int i = 0; i < s.rank(); ++i) {
      if (s[i] == -1) {
        KILN_CHECK(infer < 0, "reshape: more than one -1 in ", s.str());
        infer = i;
      } else {
        known *= s[i];
      }
    }
    if (infer >= 0) {
      KILN_CHECK(known > 0 && numel() % known == 0, "reshape: cannot infer -1 in ", s.str(), " from ", shape_.str());
      s[infer] = numel() / known;
    }
    KILN_CHECK(s.numel() == numel(), "reshape: shape ", shape_.str(), " (", numel(), " elements) cannot become ",
               s.str(), " (", s.numel(), " elements)");
    tensor t = contiguous();
    t.shape_ = s;
    t.strides_ = s.contiguous_strides();
    return t;
  }
  tensor transpose(int d0, int d1) const {
    d0 = norm_dim(d0, "transpose");
    d1 = norm_dim(d1, "transpose");
    tensor t = *this;
    std::swap(t.shape_[d0], t.shape_[d1]);
    std::swap(t.strides_[d0], t.strides_[d1]);
    return t;
  }
  tensor permute(std::initializer_list<int> order) const {
    KILN_CHECK(static_cast<int>(order.size()) == rank(), "permute: ", order.size(), " axes given for rank ", rank());
    tensor t = *this;
    int i = 0;
    std::vector<bool> seen(static_cast<std::size_t>(rank()));
    for (int d : order) {
      d = norm_dim(d, "permute");
      KILN_CHECK(!seen[static_cast<std::size_t>(d)], "permute: axis ", d, " repeated");
      seen[static_cast<std::size_t>(d)] = true;
      t.shape_[i] = shape_[d];
      t.strides_[i] = strides_[d];
      ++i;
    }
    return t;
  }
  // Elements [start, end) of `dim` with a step; negative start/end count from the back.
  tensor slice(int dim, std::int64_t start, std::int64_t end, std::int64_t step = 1) const {
    dim = norm_dim(dim, "slice");
    const std::int64_t n = shape_[dim];
    if (start < 0) start += n;
    if (end < 0) end += n;
    KILN_CHECK(step > 0, "slice: step must be positive, got ", step);
    KILN_CHECK(0 <= start && start <= end && end <= n, "slice: range [", start, ", ", end, ") out of bounds for dim ",
               dim, " of shape ", shape_.str());
    tensor t = *this;
    t.offset_ += start * strides_[dim];
    t.shape_[dim] = (end - start + step - 1) / step;
    t.strides_[dim] *= step;
    return t;
  }
  // Drops `dim`, keeping index i of it.
  tensor select(int dim, std::int64_t i) const {
    dim = norm_dim(dim, "select");
    KILN_CHECK(0 <= i && i < shape_[dim], "select: index ", i, " out of bounds for dim ", dim, " of shape ",
               shape_.str());
    tensor t;
    t.storage_ = storage_;
    t.offset_ = offset_ + i * strides_[dim];
    for (int k = 0; k < rank(); ++k)
      if (k != dim) {
        t.shape_.push_back(shape_[k]);
        t.strides_.push_back(strides_[k]);
      }
    return t;
  }
  // Splits dimension `dim` into `sizes` (their product must equal its size): always a
  // view, whatever the strides (a column slice of a packed QKV tensor stays in place).
  tensor unflatten(int dim, std::initializer_list<std::int64_t> sizes) const {
    dim = norm_dim(dim, "unflatten");
    std::int64_t prod = 1;
    for (auto n : sizes) prod *= n;
    KILN_CHECK(prod == shape_[dim], "unflatten: sizes multiply to ", prod, ", dimension ", dim, " of shape ",
               shape_.str(), " has ", shape_[dim]);
    tensor t;
    t.storage_ = storage_;
    t.offset_ = offset_;
    for (int k = 0; k < rank(); ++k) {
      if (k != dim) {
        t.shape_.push_back(shape_[k]);
        t.strides_.push_back(strides_[k]);
        continue;
      }
      std::int64_t inner = strides_[k] * prod;
      for (auto n : sizes) {
        inner /= n;
        t.shape_.push_back(n);
        t.strides_.push_back(inner);
      }
    }
    return t;
  }
  tensor unsqueeze(int dim) const {
    if (dim < 0) dim += rank() + 1;
    KILN_CHECK(0 <= dim && dim <= rank(), "unsqueeze: dim ", dim, " out of range for rank ", rank());
    tensor t;
    t.storage_ = storage_;
    t.offset_ = offset_;
    for (int k = 0; k <= rank(); ++k) {
      if (k == dim) {
        t.shape_.push_back(1);
        t.strides_.push_back(k < rank() ? shape_[k] * strides_[k] : 1);
      }
      if (k < rank()) {
        t.shape_.push_back(shape_[k]);
        t.strides_.push_back(strides_[k]);
      }
    }
    return t;
  }

  int norm_dim(int d, const char* op) const {
    const int r = rank();
    const int nd = d < 0 ? d + r : d;
    KILN_CHECK(0 <= nd && nd < r, op, ": dimension ", d, " out of range for shape ", shape_.str());
    return nd;
  }

 private:
  template <class... I>
  std::int64_t element_offset(I... idx) const {
    KILN_CHECK(static_cast<int>(sizeof...(I)) == rank(), "tensor: ", sizeof...(I), " indices for rank ", rank(),
               " shape ", shape_.str());
    const std::int64_t ix[] = {static_cast<std::int64_t>(idx)..., 0};
    std::int64_t off = 0;
    for (int k = 0; k < rank(); ++k) {
      KILN_CHECK(0 <= ix[k] && ix[k] < shape_[k], "tensor: index ", ix[k], " out of bounds for dim ", k, " of shape ",
                 shape_.str());
      off += ix[k] * strides_[k];
    }
    return off;
  }
  std::int64_t flat_offset(std::int64_t i) const {
    std::int64_t off = 0;
    for (int k = rank() - 1; k >= 0; --k) {
      off += (i % shape_[k]) * strides_[k];
      i /= shape_[k];
    }
    return off;
  }
  void require_contiguous(const char* what) const {
    KILN_CHECK(is_contiguous(), what, ": tensor of shape ", shape_.str(), " is not contiguous; call contiguous()");
  }

  std::shared_ptr<storage_block<Dev>> storage_;
  std::int64_t offset_ = 0;
  kiln::shape shape_;
  kiln::strides strides_;
};

// Shape check used by ops: names the op and both shapes.
inline void check_same_shape(const shape& a, const shape& b, const char* op) {
  KILN_CHECK(a == b, op, ": shape mismatch, ", a.str(), " vs ", b.str());
}

}  // namespace kiln
