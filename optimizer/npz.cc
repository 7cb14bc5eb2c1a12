#include "optimizer/npz.h"

#include <fcntl.h>
#include <unistd.h>
#include <zip.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>

#include "absl/status/status.h"

namespace gradserve::optimizer {
namespace {

constexpr char kSuffix[] = ".npy";

absl::Status ZipError(const std::string& what, zip_error_t* error) {
  absl::Status status = absl::InternalError(what + ": " + zip_error_strerror(error));
  zip_error_fini(error);
  return status;
}

absl::Status Errno(const std::string& what) {
  return absl::InternalError(what + ": " + std::strerror(errno));
}

// fsync of a file or directory by path: rename alone orders nothing on disk.
absl::Status SyncPath(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return Errno("open " + path);
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  errno = saved;
  return rc == 0 ? absl::OkStatus() : Errno("fsync " + path);
}

}  // namespace

absl::Status WriteNpzAtomically(const std::string& path, const NpzArrays& arrays) {
  const std::filesystem::path target(path);
  const std::string directory =
      target.has_parent_path() ? target.parent_path().string() : std::string(".");
  const std::string temporary = directory + "/." + target.filename().string() + ".tmp";
  // The members' bytes must outlive zip_close, which is when libzip reads them.
  std::vector<std::string> members;
  members.reserve(arrays.size());
  for (const auto& [name, array] : arrays) members.push_back(client::npy::Serialize(array));

  int open_error = 0;
  zip_t* archive = zip_open(temporary.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &open_error);
  if (archive == nullptr) {
    zip_error_t error;
    zip_error_init_with_code(&error, open_error);
    return ZipError("cannot create " + temporary, &error);
  }
  for (size_t i = 0; i < arrays.size(); ++i) {
    const std::string member = arrays[i].first + kSuffix;
    zip_source_t* source = zip_source_buffer(archive, members[i].data(), members[i].size(), 0);
    zip_int64_t index = source == nullptr ? -1
                                          : zip_file_add(archive, member.c_str(), source,
                                                         ZIP_FL_ENC_UTF_8 | ZIP_FL_OVERWRITE);
    if (index < 0) {
      if (source != nullptr) zip_source_free(source);
      absl::Status status = absl::InternalError("cannot add " + member + " to " + temporary + ": " +
                                                zip_strerror(archive));
      zip_discard(archive);
      return status;
    }
    // Stored, as numpy.savez writes (not savez_compressed): np.load can then map members.
    zip_set_file_compression(archive, index, ZIP_CM_STORE, 0);
  }
  if (zip_close(archive) != 0) {
    absl::Status status =
        absl::InternalError("cannot write " + temporary + ": " + zip_strerror(archive));
    zip_discard(archive);
    std::remove(temporary.c_str());
    return status;
  }
  if (absl::Status status = SyncPath(temporary, O_RDONLY); !status.ok()) {
    std::remove(temporary.c_str());
    return status;
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    absl::Status status = Errno("rename " + temporary + " to " + path);
    std::remove(temporary.c_str());
    return status;
  }
  return SyncPath(directory, O_RDONLY | O_DIRECTORY);
}

absl::StatusOr<std::map<std::string, client::npy::Array>> ReadNpz(const std::string& path,
                                                                  int64_t max_member_bytes,
                                                                  int64_t max_members) {
  int open_error = 0;
  std::unique_ptr<zip_t, int (*)(zip_t*)> archive(
      zip_open(path.c_str(), ZIP_RDONLY | ZIP_CHECKCONS, &open_error), zip_close);
  if (archive == nullptr) {
    zip_error_t error;
    zip_error_init_with_code(&error, open_error);
    return ZipError("cannot open " + path, &error);
  }
  const zip_int64_t count = zip_get_num_entries(archive.get(), 0);
  if (count < 0 || count > max_members) {
    return absl::InvalidArgumentError(path + ": " + std::to_string(count) +
                                      " members, more than the " + std::to_string(max_members) +
                                      " a checkpoint may hold");
  }
  std::map<std::string, client::npy::Array> arrays;
  for (zip_int64_t i = 0; i < count; ++i) {
    zip_stat_t stat;
    zip_stat_init(&stat);
    if (zip_stat_index(archive.get(), i, 0, &stat) != 0 || (stat.valid & ZIP_STAT_NAME) == 0 ||
        (stat.valid & ZIP_STAT_SIZE) == 0) {
      return absl::InvalidArgumentError(path + ": member " + std::to_string(i) + ": " +
                                        zip_strerror(archive.get()));
    }
    std::string name = stat.name;
    const std::string where = path + ": " + name;
    if (name.size() <= std::strlen(kSuffix) ||
        name.compare(name.size() - std::strlen(kSuffix), std::string::npos, kSuffix) != 0) {
      return absl::InvalidArgumentError(where + ": not a .npy member");
    }
    if (stat.size > static_cast<zip_uint64_t>(max_member_bytes)) {
      return absl::InvalidArgumentError(where + ": " + std::to_string(stat.size) +
                                        " bytes, more than the limit of " +
                                        std::to_string(max_member_bytes));
    }
    std::unique_ptr<zip_file_t, int (*)(zip_file_t*)> file(zip_fopen_index(archive.get(), i, 0),
                                                           zip_fclose);
    if (file == nullptr) {
      return absl::InvalidArgumentError(where + ": " + zip_strerror(archive.get()));
    }
    std::string bytes(stat.size, '\0');
    const zip_int64_t read = zip_fread(file.get(), bytes.data(), bytes.size());
    if (read < 0 || static_cast<zip_uint64_t>(read) != stat.size) {
      return absl::InvalidArgumentError(where + ": truncated or corrupt (" +
                                        zip_file_strerror(file.get()) + ")");
    }
    std::string error;
    std::optional<client::npy::Array> array = client::npy::Parse(bytes, where, &error);
    if (!array) return absl::InvalidArgumentError(error);
    name.resize(name.size() - std::strlen(kSuffix));
    arrays.emplace(std::move(name), *std::move(array));
  }
  return arrays;
}

}  // namespace gradserve::optimizer
