// kiln/io/atomic_file.hpp — replace a file so that a crash never leaves it torn.
//
// Spec: write_atomically(path, fill) calls fill(FILE*) to write a temporary file in the
// same directory as `path` (".<name>.tmp.<pid>.<n>"), flushes and fsyncs it, renames it
// over `path` (rename(2) is atomic within a file system) and fsyncs the directory so the
// rename itself is durable. At every instant a reader — or a process restarted after
// SIGKILL or power loss — sees either the complete old file or the complete new one.
// On any failure the temporary is removed, `path` is untouched, and kiln::error names
// the file and the system's reason. Leftover temporaries of a killed writer are never
// mistaken for the file; remove_stale_temporaries(dir) clears them.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <concepts>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include "kiln/core/error.hpp"

namespace kiln::io {

inline void fsync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // some file systems do not allow it; the rename is still atomic
  ::fsync(fd);
  ::close(fd);
}

template <class Fill>
requires std::invocable<Fill&, std::FILE*>
void write_atomically(const std::filesystem::path& path, Fill&& fill) {
  namespace fs = std::filesystem;
  static std::atomic<unsigned> counter{0};
  const fs::path dir = path.parent_path();
  if (!dir.empty()) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    KILN_CHECK(!ec, "cannot create directory ", dir.string(), " for ", path.string(), ": ", ec.message());
  }
  const fs::path tmp = dir / ("." + path.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                              std::to_string(counter.fetch_add(1)));
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
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::error_code ec;
    fs::remove(tmp, ec);
    detail::fail("cannot rename ", tmp.string(), " to ", path.string(), ": ", std::strerror(err));
  }
  fsync_directory(dir);
}

inline void write_atomically(const std::filesystem::path& path, std::string_view bytes) {
  write_atomically(path, [&](std::FILE* f) {
    if (std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size())
      detail::fail("failed writing ", path.string(), ": ", std::strerror(errno));
  });
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
