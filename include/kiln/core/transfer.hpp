// kiln/core/transfer.hpp — moving tensors between devices, and reading a scalar back.
//
// Spec: to_device<To>(t) returns t's elements on device To: the same tensor (shared
// storage, no copy) when t already lives there, a contiguous copy otherwise. to_host(t)
// is to_device<cpu>(t); host_copy(t) is always a fresh host tensor. A copy from a cuda tensor waits for kiln's compute
// stream, so the host sees every op enqueued before it. item(t) reads the single element of a one-element tensor of any
// device as a double (one 2-8 byte copy for a device tensor). These are the only places where code that is generic over
// the device crosses it: model initialisation (drawn on the host from kiln's generator, so a cpu and a cuda run start
// from the same weights), checkpoints and safetensors (written from host copies), logged values and metrics.
#pragma once

#include <cstring>
#include <type_traits>

#include "kiln/core/cuda_runtime.hpp"
#include "kiln/core/tensor.hpp"

namespace kiln {

template <device To, element T, device From>
tensor<T, To> to_device(const tensor<T, From>& t) {
  if constexpr (std::is_same_v<To, From>) {
    return t;
  } else if constexpr (From::is_host) {
    return cuda_runtime::to_device(t);
  } else if constexpr (To::is_host) {
    return cuda_runtime::to_host(t.contiguous());
  } else {
    static_assert(std::is_same_v<To, From>, "kiln::to_device: no path between these two devices");
  }
}

template <element T, device Dev>
tensor<T, cpu> to_host(const tensor<T, Dev>& t) {
  return to_device<cpu>(t);
}

// A host copy that shares nothing with t (to_host shares a host tensor's storage).
template <element T, device Dev>
tensor<T, cpu> host_copy(const tensor<T, Dev>& t) {
  if constexpr (Dev::is_host)
    return t.clone();
  else
    return to_host(t);
}

template <element T, device Dev>
double item(const tensor<T, Dev>& t) {
  KILN_CHECK(t.numel() == 1, "item: expects a one-element tensor, got shape ", t.shape().str());
  if constexpr (Dev::is_host)
    return static_cast<double>(static_cast<compute_t<T>>(t.flat(0)));
  else
    return item(to_host(t));
}

// Copies a host tensor's values into `dst` (same shape) on dst's device.
template <element T, device Dev>
void copy_from_host(tensor<T, Dev>& dst, const tensor<T, cpu>& src) {
  if constexpr (Dev::is_host)
    dst.copy_from(src);
  else
    dst.copy_from(to_device<Dev>(src));
}

// Copies `bytes` raw bytes from host memory into a contiguous tensor on its device
// (the file loaders' last step: bytes from a mapped file into a parameter).
template <element T, device Dev>
void copy_bytes_from_host(tensor<T, Dev>& dst, const void* src, std::size_t bytes) {
  KILN_CHECK(dst.is_contiguous() && bytes == dst.nbytes(), "copy_bytes_from_host: ", bytes, " bytes into a ",
             dst.is_contiguous() ? "" : "strided ", "tensor of ", dst.nbytes(), " bytes");
  if (bytes == 0) return;
  if constexpr (Dev::is_host) {
    std::memcpy(static_cast<void*>(dst.data()), src, bytes);
  } else {
    tensor<T, cpu> h(dst.shape());
    std::memcpy(static_cast<void*>(h.data()), src, bytes);
    dst.copy_from(to_device<Dev>(h));
  }
}

}  // namespace kiln
