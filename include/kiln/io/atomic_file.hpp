// kiln/io/atomic_file.hpp — replace a file so that a crash never leaves it torn.
//
// Spec: write_atomically(path, fill) calls fill(FILE*) — or fill(file_sink&), the path for
// large files — to write a temporary file in the same directory as `path`
// (".<name>.tmp.<pid>.<n>"), flushes and fsyncs it, renames it over `path` (rename(2) is
// atomic within a file system) and fsyncs the directory so the rename itself is durable.
// At every instant a reader — or a process restarted after SIGKILL or power loss — sees
// either the complete old file or the complete new one. On any failure the temporary is
// removed, `path` is untouched, and kiln::error names the file and the system's reason.
// Leftover temporaries of a killed writer are never mistaken for the file;
// remove_stale_temporaries(dir) clears them.
// file_sink writes with no stdio copy (small writes are gathered, large ones go straight
// from the caller's memory), can leave a range to fill later (write_at), and asks the
// kernel to start writing back every 8 MiB (Linux sync_file_range), so the disk works
// while the caller produces the rest and the final fsync waits for little.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kiln/core/error.hpp"

namespace kiln::io {

inline void fsync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // some file systems do not allow it; the rename is still atomic
  ::fsync(fd);
  ::close(fd);
}

// The temporary file write_atomically fills, seen through its descriptor.
class file_sink {
 public:
  static constexpr std::size_t writeback_bytes = std::size_t{8} << 20;  // start writeback this often
  static constexpr std::size_t gather_bytes = std::size_t{256} << 10;   // writes below 1/4 of it are gathered

  file_sink(int fd, std::filesystem::path path) : fd_(fd), path_(std::move(path)) {}
  file_sink(const file_sink&) = delete;
  file_sink& operator=(const file_sink&) = delete;

  // Appends n bytes.
  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const std::byte*>(data);
    if (n < gather_bytes / 4) {
      if (buf_.size() + n > gather_bytes) flush();
      if (buf_.capacity() < gather_bytes) buf_.reserve(gather_bytes);
      buf_.insert(buf_.end(), p, p + n);
      pos_ += n;
      return;
    }
    flush();
    while (n > 0) {  // in pieces, so writeback of a large tensor starts while it is copied in
      const std::size_t k = std::min(n, writeback_bytes - static_cast<std::size_t>(pos_ % writeback_bytes));
      put(pos_, p, k);
      pos_ += k;
      p += k;
      n -= k;
      start_writeback();
    }
  }
  // Leaves n bytes at the current position for write_at (a hole until then).
  void skip(std::uint64_t n) {
    flush();
    pos_ += n;
  }
  // Writes n bytes at `offset`, below position(): a skipped range, or bytes to replace.
  void write_at(std::uint64_t offset, const void* data, std::size_t n) {
    KILN_CHECK(offset + n <= pos_, "file_sink::write_at: bytes ", offset, "..", offset + n, " of ", path_.string(),
               " lie past its end (", pos_, ")");
    flush();
    put(offset, static_cast<const std::byte*>(data), n);
  }
  std::uint64_t position() const { return pos_; }
  const std::filesystem::path& path() const { return path_; }  // the file being replaced
  // Hands gathered bytes to the kernel (write_atomically calls it before the fsync).
  void flush() {
    if (buf_.empty()) return;
    put(pos_ - buf_.size(), buf_.data(), buf_.size());
    buf_.clear();
    start_writeback();
  }

 private:
  void put(std::uint64_t offset, const std::byte* p, std::size_t n) {
    while (n > 0) {
      const ::ssize_t w = ::pwrite(fd_, p, n, static_cast<::off_t>(offset));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0)
        detail::fail("failed writing ", path_.string(), ": ", std::strerror(w < 0 ? errno : EIO), " (", path_.string(),
                     " is unchanged)");
      p += w;
      n -= static_cast<std::size_t>(w);
      offset += static_cast<std::uint64_t>(w);
    }
  }
  // Asks the kernel to write back what was appended since the last call, once that is
  // writeback_bytes or more; advisory (the final fsync is what makes the file durable).
  void start_writeback() {
    const std::uint64_t end = pos_ - buf_.size();
    if (end - written_back_ < writeback_bytes) return;
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
    ::sync_file_range(fd_, static_cast<::off_t>(written_back_), static_cast<::off_t>(end - written_back_),
                      SYNC_FILE_RANGE_WRITE);
#endif
    written_back_ = end;
  }

  int fd_;
  std::filesystem::path path_;
  std::uint64_t pos_ = 0, written_back_ = 0;
  std::vector<std::byte> buf_;
};

}  // namespace kiln::io

namespace kiln::detail {
// ".<name>.tmp.<pid>.<n>" beside `path`, whose directory is created if need be.
inline std::filesystem::path temporary_for(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  static std::atomic<unsigned> counter{0};
  const fs::path dir = path.parent_path();
  if (!dir.empty()) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    KILN_CHECK(!ec, "cannot create directory ", dir.string(), " for ", path.string(), ": ", ec.message());
  }
  return dir / ("." + path.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                std::to_string(counter.fetch_add(1)));
}
// Renames the complete, fsynced temporary over `path` and makes the rename durable.
inline void replace_with_temporary(const std::filesystem::path& tmp, const std::filesystem::path& path) {
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    fail("cannot rename ", tmp.string(), " to ", path.string(), ": ", std::strerror(err));
  }
  io::fsync_directory(path.parent_path());
}
}  // namespace kiln::detail

namespace kiln::io {

template <class Fill>
requires std::invocable<Fill&, file_sink&>
void write_atomically(const std::filesystem::path& path, Fill&& fill) {
  namespace fs = std::filesystem;
  const fs::path tmp = detail::temporary_for(path);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  KILN_CHECK(fd >= 0, "cannot create ", tmp.string(), " (writing ", path.string(), "): ", std::strerror(errno));
  auto discard = [&] {
    ::close(fd);
    std::error_code ec;
    fs::remove(tmp, ec);
  };
  try {
    file_sink sink(fd, path);
    fill(sink);
    sink.flush();
  } catch (...) {
    discard();
    throw;
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    discard();
    detail::fail("failed writing ", path.string(), ": ", std::strerror(err), " (", path.string(), " is unchanged)");
  }
  if (::close(fd) != 0) {
    const int err = errno;
    std::error_code ec;
    fs::remove(tmp, ec);
    detail::fail("failed closing ", tmp.string(), ": ", std::strerror(err), " (", path.string(), " is unchanged)");
  }
  detail::replace_with_temporary(tmp, path);
}

template <class Fill>
requires std::invocable<Fill&, std::FILE*>
void write_atomically(const std::filesystem::path& path, Fill&& fill) {
  namespace fs = std::filesystem;
  const fs::path tmp = detail::temporary_for(path);
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  KILN_CHECK(f != nullptr, "cannot create ", tmp.string(), " (writing ", path.string(), "): ", std::strerror(errno));
  auto discard = [&] {
    std::fclose(f);
    std::error_code ec;
    fs::remove(tmp, ec);
  };
  try {
    fill(f);
  } catch (...) {
    discard();
    throw;
  }
  if (std::ferror(f) || std::fflush(f) != 0 || ::fsync(::fileno(f)) != 0) {
    const int err = errno;
    discard();
    detail::fail("failed writing ", path.string(), ": ", std::strerror(err), " (", path.string(), " is unchanged)");
  }
  if (std::fclose(f) != 0) {
    const int err = errno;
    std::error_code ec;
    fs::remove(tmp, ec);
    detail::fail("failed closing ", tmp.string(), ": ", std::strerror(err), " (", path.string(), " is unchanged)");
  }
  detail::replace_with_temporary(tmp, path);
}

inline void write_atomically(const std::filesystem::path& path, std::string_view bytes) {
  write_atomically(path, [&](file_sink& f) { f.write(bytes.data(), bytes.size()); });
}

// Removes ".<name>.tmp.*" files that a killed writer left in `dir`; returns how many.
inline int remove_stale_temporaries(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  int n = 0;
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() > 1 && name[0] == '.' && name.find(".tmp.") != std::string::npos) {
      std::error_code rm;
      if (fs::remove(it->path(), rm)) ++n;
    }
  }
  return n;
}

}  // namespace kiln::io
