// kiln/io/safetensors.hpp — the safetensors format: a validated, memory-mapped reader
// and an atomic writer, interoperable with Hugging Face's `safetensors` package.
//
// Format (https://huggingface.co/docs/safetensors): 8 bytes little-endian N, then N bytes
// of UTF-8 JSON (an object: tensor name → {"dtype", "shape", "data_offsets": [begin, end]},
// plus an optional "__metadata__" object of string → string), then the data buffer; offsets
// are relative to the buffer's start.
//
// Spec (reader): safetensors_view::parse(bytes, name) validates the whole header before
// anything is returned, and rejects, naming the file and the tensor: a file shorter than
// 8 bytes or than 8 + N; N larger than 100 MB; a header that is not a JSON object or
// has duplicate keys; an entry without dtype/shape/data_offsets or with other fields; an
// unknown dtype name; a negative or overflowing shape; begin > end; a byte size that
// differs from numel × dtype size; tensors that overlap, leave a hole, or do not end
// exactly at the end of the file (the Python package enforces the same). Metadata values
// must be strings. safetensors_file::open(path) memory-maps the file read-only, so
// reading a tensor is zero-copy: view<T>(name) is a span into the mapping (dtype checked);
// load<T>(name) copies into a kiln tensor.
// Spec (writer): safetensors_writer collects named tensors (sharing their storage, no
// copy) and metadata, and write(path) streams header and data to the file atomically
// (kiln/io/atomic_file.hpp). Tensors are laid out by decreasing element size, then
// name, after a header padded with spaces to a multiple of 8 bytes, so every tensor is
// aligned to its element size in the file and in a mapping of it. write_watched(path,
// watch, finish) writes the same layout data first: watch sees each tensor's bytes as
// they go out (a checksum taken there reads them while they are in cache), finish may then
// set metadata from what it saw, and the header goes last into room reserved at the front
// (padded with spaces, so the file is as valid as any other).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kiln/core/dtype.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/io/atomic_file.hpp"
#include "kiln/io/json.hpp"

namespace kiln::io {

// Every dtype name the safetensors format defines with a whole number of bytes per element.
struct st_dtype_info {
  std::string_view name;
  std::size_t size;
};
inline constexpr st_dtype_info st_dtypes[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
    {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
    {"F32", 4},  {"I64", 8}, {"U64", 8}, {"F64", 8},     {"C64", 8},
};
inline std::optional<std::size_t> st_dtype_size(std::string_view name) {
  for (auto& d : st_dtypes)
    if (d.name == name) return d.size;
  return std::nullopt;
}

struct tensor_entry {
  std::string name;
  std::string dtype;  // safetensors spelling: "F32", "BF16", ...
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte range within the data buffer

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::uint64_t nbytes() const { return end - begin; }
  std::string shape_str() const {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

inline constexpr std::uint64_t max_header_bytes = 100'000'000;  // as the Python package

// A parsed, validated view of safetensors bytes that someone else owns.
class safetensors_view {
 public:
  safetensors_view() = default;

  static safetensors_view parse(std::span<const std::byte> bytes, std::string name = "safetensors data") {
    safetensors_view v;
    v.name_ = std::move(name);
    v.parse_header(bytes);
    return v;
  }

  const std::string& name() const { return name_; }
  const std::vector<tensor_entry>& tensors() const { return tensors_; }
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  std::optional<std::string> metadata(std::string_view key) const {
    for (auto& [k, v] : metadata_)
      if (k == key) return v;
    return std::nullopt;
  }
  const tensor_entry* find(std::string_view tensor) const {
    for (auto& t : tensors_)
      if (t.name == tensor) return &t;
    return nullptr;
  }
  const tensor_entry& at(std::string_view tensor) const {
    const tensor_entry* e = find(tensor);
    KILN_CHECK(e != nullptr, name_, ": no tensor named '", tensor, "'");
    return *e;
  }
  bool contains(std::string_view tensor) const { return find(tensor) != nullptr; }
  std::span<const std::byte> bytes(const tensor_entry& e) const {
    return data_.subspan(static_cast<std::size_t>(e.begin), static_cast<std::size_t>(e.nbytes()));
  }
  std::uint64_t data_offset() const { return data_offset_; }

  // Zero-copy typed view of a tensor; its dtype must be T's, and it must be aligned
  // (always so for files kiln writes and for the Python package's).
  template <element T>
  std::span<const T> view(std::string_view tensor) const {
    const tensor_entry& e = at(tensor);
    check_dtype<T>(e);
    auto b = bytes(e);
    KILN_CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % alignof(T) == 0, name_, ": tensor '", tensor,
               "' is not aligned to ", alignof(T), " bytes; use load<T>() to copy it");
    return {reinterpret_cast<const T*>(b.data()), b.size() / sizeof(T)};
  }
  // A copy of a tensor in a kiln tensor of element T (dtype must match).
  template <element T>
  tensor<T> load(std::string_view tensor_name) const {
    const tensor_entry& e = at(tensor_name);
    check_dtype<T>(e);
    auto t = tensor<T>::empty(shape_of(e));
    auto b = bytes(e);
    if (!b.empty()) std::memcpy(t.data(), b.data(), b.size());
    return t;
  }
  // A copy converted to T from any floating dtype (F32, F16, BF16, F64): how model weights
  // stored in another precision are read.
  template <floating_element T>
  tensor<T> load_as(std::string_view tensor_name) const {
    const tensor_entry& e = at(tensor_name);
    tensor<T> out(shape_of(e));
    auto b = bytes(e);
    auto convert = [&]<class S>(S) {
      std::vector<S> tmp(static_cast<std::size_t>(e.numel()));
      if (!b.empty()) std::memcpy(tmp.data(), b.data(), b.size());
      for (std::size_t i = 0; i < tmp.size(); ++i) out.data()[i] = static_cast<T>(static_cast<compute_t<S>>(tmp[i]));
    };
    if (e.dtype == "F32")
      convert(f32{});
    else if (e.dtype == "F16")
      convert(f16{});
    else if (e.dtype == "BF16")
      convert(bf16{});
    else if (e.dtype == "F64")
      convert(f64{});
    else
      kiln::detail::fail(name_, ": tensor '", tensor_name, "' has dtype ", e.dtype,
                         "; a model weight must be F32, F16, BF16 or F64");
    return out;
  }
  static kiln::shape shape_of(const tensor_entry& e) { return kiln::shape(std::span<const std::int64_t>(e.shape)); }
  template <element T>
  void check_dtype(const tensor_entry& e) const {
    KILN_CHECK(e.dtype == dtype_name(dtype_of<T>), name_, ": tensor '", e.name, "' has dtype ", e.dtype, ", expected ",
               dtype_name(dtype_of<T>));
  }

 private:
  void parse_header(std::span<const std::byte> bytes) {
    KILN_CHECK(bytes.size() >= 8, name_, ": ", bytes.size(),
               " bytes is too short for a safetensors file (expected an 8-byte header length first)");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(bytes[static_cast<std::size_t>(i)]);
    KILN_CHECK(n <= max_header_bytes, name_, ": header length ", n, " exceeds the limit of ", max_header_bytes,
               " bytes (not a safetensors file, or a corrupt one)");
    KILN_CHECK(n <= bytes.size() - 8, name_, ": header length ", n, " runs past the end of the file (", bytes.size(),
               " bytes): the file is truncated or not safetensors");
    KILN_CHECK(n >= 2, name_, ": header length ", n, " is too short for a JSON object");
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, static_cast<std::size_t>(n));
    KILN_CHECK(text[0] == '{', name_, ": the header does not start with '{'");
    data_offset_ = 8 + n;
    data_ = bytes.subspan(static_cast<std::size_t>(data_offset_));
    const json h = json::parse(text, name_ + " (header)");
    KILN_CHECK(h.is_object(), name_, ": the header is not a JSON object");
    for (auto& [key, val] : h.as_object()) {
      if (key == "__metadata__") {
        KILN_CHECK(val.is_object(), name_, ": __metadata__ must be an object of strings, got ", val.describe());
        for (auto& [mk, mv] : val.as_object()) {
          KILN_CHECK(mv.is_string(), name_, ": __metadata__ value '", mk, "' must be a string, got ", mv.describe());
          metadata_.emplace_back(mk, mv.as_string());
        }
        continue;
      }
      tensors_.push_back(parse_entry(key, val));
    }
    // Offsets: sorted, they must tile the buffer exactly (no overlap, no hole, no tail).
    std::vector<const tensor_entry*> order;
    for (auto& t : tensors_) order.push_back(&t);
    std::stable_sort(order.begin(), order.end(),
                     [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
    std::uint64_t at = 0;
    const tensor_entry* prev = nullptr;
    for (auto* t : order) {
      if (t->begin < at)
        detail::fail(name_, ": tensor '", t->name, "' (bytes ", t->begin, "..", t->end, ") overlaps tensor '",
                     prev->name, "' (bytes ", prev->begin, "..", prev->end, ")");
      if (t->begin > at)
        detail::fail(name_, ": hole of ", t->begin - at, " bytes before tensor '", t->name, "' (its data starts at ",
                     t->begin, ", the previous tensor ends at ", at, ")");
      at = t->end;
      prev = t;
    }
    KILN_CHECK(at <= data_.size(), name_, ": tensor '", prev ? prev->name : "", "' ends at byte ", at,
               " of the data buffer, but the file holds only ", data_.size(), " data bytes (truncated file)");
    KILN_CHECK(at == data_.size(), name_, ": ", data_.size() - at,
               " bytes after the last tensor are not described by the header");
  }

  tensor_entry parse_entry(const std::string& key, const json& val) const {
    const std::string where = name_ + ": tensor '" + key + "'";
    KILN_CHECK(val.is_object(), where, ": expected an object with dtype, shape, data_offsets; got ", val.describe());
    tensor_entry e;
    e.name = key;
    bool has_dtype = false, has_shape = false, has_offsets = false;
    for (auto& [f, v] : val.as_object()) {
      if (f == "dtype") {
        e.dtype = v.as_string(where + ": dtype");
        KILN_CHECK(st_dtype_size(e.dtype).has_value(), where, ": unknown dtype '", e.dtype,
                   "' (expected one of BOOL U8 I8 I16 U16 F16 BF16 I32 U32 F32 I64 U64 F64 C64 F8_E5M2 F8_E4M3 "
                   "F8_E8M0)");
        has_dtype = true;
      } else if (f == "shape") {
        for (auto& d : v.as_array(where + ": shape")) {
          const std::int64_t x = d.as_int(where + ": shape entry");
          KILN_CHECK(x >= 0, where, ": negative dimension ", x, " in shape");
          e.shape.push_back(x);
        }
        has_shape = true;
      } else if (f == "data_offsets") {
        auto& a = v.as_array(where + ": data_offsets");
        KILN_CHECK(a.size() == 2, where, ": data_offsets must be [begin, end], got ", a.size(), " numbers");
        const std::int64_t b = a[0].as_int(where + ": data_offsets[0]"), en = a[1].as_int(where + ": data_offsets[1]");
        KILN_CHECK(b >= 0 && en >= 0, where, ": negative data offset");
        KILN_CHECK(b <= en, where, ": data_offsets [", b, ", ", en, "] end before they begin");
        e.begin = static_cast<std::uint64_t>(b);
        e.end = static_cast<std::uint64_t>(en);
        has_offsets = true;
      } else {
        detail::fail(where, ": unexpected field '", f, "' (expected dtype, shape, data_offsets)");
      }
    }
    KILN_CHECK(has_dtype && has_shape && has_offsets, where, ": missing field '",
               !has_dtype   ? "dtype"
               : !has_shape ? "shape"
                            : "data_offsets",
               "'");
    // numel × size, overflow-checked.
    unsigned __int128 bytes = *st_dtype_size(e.dtype);
    for (auto d : e.shape) {
      bytes *= static_cast<unsigned __int128>(d);
      KILN_CHECK(bytes <= (static_cast<unsigned __int128>(1) << 62), where, ": shape ", e.shape_str(), " is too large");
    }
    KILN_CHECK(static_cast<std::uint64_t>(bytes) == e.nbytes(), where, ": shape ", e.shape_str(), " of ", e.dtype,
               " needs ", static_cast<std::uint64_t>(bytes), " bytes but data_offsets [", e.begin, ", ", e.end,
               "] span ", e.nbytes());
    return e;
  }

  std::string name_;
  std::vector<tensor_entry> tensors_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  std::span<const std::byte> data_;
  std::uint64_t data_offset_ = 0;
};

// A read-only memory mapping of a whole file.
class mapped_file {
 public:
  mapped_file() = default;
  explicit mapped_file(const std::filesystem::path& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    KILN_CHECK(fd >= 0, "cannot open ", path.string(), ": ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      detail::fail("cannot stat ", path.string(), ": ", std::strerror(err));
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      KILN_CHECK(p != MAP_FAILED, "cannot map ", path.string(), ": ", std::strerror(err));
      data_ = static_cast<const std::byte*>(p);
    } else {
      ::close(fd);
    }
  }
  mapped_file(mapped_file&& o) noexcept
      : path_(std::move(o.path_)), data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapped_file& operator=(mapped_file&& o) noexcept {
    if (this != &o) {
      release();
      path_ = std::move(o.path_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~mapped_file() { release(); }
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void release() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
  }
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// A safetensors file, memory-mapped and validated. Views stay valid while it lives.
class safetensors_file : public safetensors_view {
 public:
  static safetensors_file open(const std::filesystem::path& path) {
    safetensors_file f;
    f.map_ = std::make_unique<mapped_file>(path);
    static_cast<safetensors_view&>(f) = safetensors_view::parse(f.map_->bytes(), path.string());
    return f;
  }
  const std::filesystem::path& path() const { return map_->path(); }

 private:
  std::unique_ptr<mapped_file> map_;  // stable address: the view's spans point into it
};

class safetensors_writer {
 public:
  // Adds a tensor; a contiguous host tensor's storage is shared (no copy) until write()
  // runs; a device tensor is copied to the host here (the value at the time of add).
  template <element T, device Dev>
  void add(std::string name, const tensor<T, Dev>& t) {
    tensor<T, cpu> c = to_host(t).contiguous();
    std::vector<std::int64_t> dims(c.shape().begin(), c.shape().end());
    const auto* p = reinterpret_cast<const std::byte*>(c.data());
    const std::size_t n = c.nbytes();
    add_raw(std::move(name), std::string(dtype_name(dtype_of<T>)), std::move(dims), std::span<const std::byte>(p, n),
            std::make_shared<tensor<T, cpu>>(std::move(c)));
  }
  // Adds raw bytes with a safetensors dtype name; `keep_alive` owns them until write().
  void add_raw(std::string name, std::string dtype, std::vector<std::int64_t> shape, std::span<const std::byte> bytes,
               std::shared_ptr<const void> keep_alive = nullptr) {
    KILN_CHECK(!name.empty() && name != "__metadata__", "safetensors_writer: invalid tensor name '", name, "'");
    for (auto& e : entries_) KILN_CHECK(e.entry.name != name, "safetensors_writer: tensor '", name, "' added twice");
    const auto sz = st_dtype_size(dtype);
    KILN_CHECK(sz.has_value(), "safetensors_writer: tensor '", name, "': unknown dtype '", dtype, "'");
    std::uint64_t numel = 1;
    for (auto d : shape) {
      KILN_CHECK(d >= 0, "safetensors_writer: tensor '", name, "': negative dimension");
      numel *= static_cast<std::uint64_t>(d);
    }
    KILN_CHECK(numel * *sz == bytes.size(), "safetensors_writer: tensor '", name, "': ", bytes.size(),
               " bytes given for ", numel, " elements of ", dtype);
    entries_.push_back(
        {{std::move(name), std::move(dtype), std::move(shape), 0, bytes.size()}, bytes, std::move(keep_alive)});
  }
  void set_metadata(std::string key, std::string value) {
    for (auto& [k, v] : metadata_)
      if (k == key) {
        v = std::move(value);
        return;
      }
    metadata_.emplace_back(std::move(key), std::move(value));
  }
  std::size_t size() const { return entries_.size(); }

  // The header JSON (with offsets assigned) and the order in which data follows it.
  std::string header(std::vector<std::size_t>* order_out = nullptr) {
    std::vector<std::size_t> order(entries_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      const auto sa = *st_dtype_size(entries_[a].entry.dtype), sb = *st_dtype_size(entries_[b].entry.dtype);
      return sa != sb ? sa > sb : entries_[a].entry.name < entries_[b].entry.name;
    });
    json h = json::object();
    if (!metadata_.empty()) {
      json m = json::object();
      for (auto& [k, v] : metadata_) m.set(k, v);
      h.set("__metadata__", std::move(m));
    }
    std::uint64_t at = 0;
    for (auto i : order) {
      auto& e = entries_[i].entry;
      const std::uint64_t n = e.nbytes();
      e.begin = at;
      e.end = at + n;
      at += n;
      json shape = json::array();
      for (auto d : e.shape) shape.push_back(json(d));
      json entry = json::object();
      entry.set("dtype", e.dtype);
      entry.set("shape", std::move(shape));
      entry.set("data_offsets", json(json::array_type{json(static_cast<std::int64_t>(e.begin)),
                                                      json(static_cast<std::int64_t>(e.end))}));
      h.set(e.name, std::move(entry));
    }
    std::string text = h.dump();
    text.append((8 - (text.size() % 8)) % 8, ' ');  // data starts 8-byte aligned
    if (order_out) *order_out = std::move(order);
    return text;
  }

  // Streams the file to `path` atomically.
  void write(const std::filesystem::path& path) {
    write_atomically(path, [&](file_sink& f) { emit([&](const void* p, std::size_t n) { f.write(p, n); }); });
  }
  // The same file, data first: watch(i, bytes) is handed tensor i's bytes (i counts add()
  // calls) in pieces of at most watch_bytes, each just before it is written; then finish()
  // runs and may set metadata, and the header is written into the room it took before the
  // data. Metadata that finish() fills must be set beforehand to a value at least as long
  // (the widest form), or the write fails.
  // Pieces end at multiples of watch_bytes in the file: a piece is still in cache when the
  // kernel copies it, and whole aligned 2 MiB writes let the page cache hold 2 MiB folios,
  // which a later mmap maps with few faults (256 KiB writes made a reload 2x slower).
  static constexpr std::size_t watch_bytes = std::size_t{2} << 20;
  template <class Watch, class Finish>
  requires std::invocable<Watch&, std::size_t, std::span<const std::byte>> && std::invocable<Finish&>
  void write_watched(const std::filesystem::path& path, Watch&& watch, Finish&& finish) {
    write_atomically(path, [&](file_sink& f) {
      std::vector<std::size_t> order;
      const std::size_t room = header(&order).size();
      f.skip(8 + room);
      for (auto i : order) {
        const auto b = entries_[i].bytes;
        for (std::size_t at = 0, k = 0; at < b.size(); at += k) {
          k = std::min(b.size() - at, watch_bytes - static_cast<std::size_t>(f.position() % watch_bytes));
          const auto piece = b.subspan(at, k);
          watch(i, piece);
          f.write(piece.data(), piece.size());
        }
      }
      finish();
      std::string h = header();
      KILN_CHECK(h.size() <= room, "safetensors_writer: the header of ", path.string(), " grew from ", room, " to ",
                 h.size(), " bytes while its data was written (set data-dependent metadata to its widest form first)");
      h.append(room - h.size(), ' ');
      std::string front(8, '\0');
      for (int k = 0; k < 8; ++k)
        front[static_cast<std::size_t>(k)] = static_cast<char>((std::uint64_t{room} >> (8 * k)) & 0xFF);
      front += h;
      f.write_at(0, front.data(), front.size());
    });
  }
  // The same bytes in memory (safetensors_view::parse reads them back).
  std::vector<std::byte> serialize() {
    std::vector<std::byte> out;
    emit([&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::byte*>(p);
      out.insert(out.end(), b, b + n);
    });
    return out;
  }

 private:
  // Hands the file's bytes to sink(pointer, size) in order: length, header, data.
  template <class Sink>
  void emit(Sink&& sink) {
    std::vector<std::size_t> order;
    const std::string h = header(&order);
    unsigned char len[8];
    const std::uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    sink(len, 8);
    sink(h.data(), h.size());
    for (auto i : order) sink(entries_[i].bytes.data(), entries_[i].bytes.size());
  }
  struct item {
    tensor_entry entry;
    std::span<const std::byte> bytes;
    std::shared_ptr<const void> keep_alive;
  };
  std::vector<item> entries_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

}  // namespace kiln::io
