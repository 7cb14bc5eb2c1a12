#include "client/npy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace gradserve::client::npy {
namespace {

using ::testing::HasSubstr;

template <typename T>
std::string Bytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

// A .npy file with `header` as its header text (padded as numpy pads it), then `data`.
std::string MakeNpy(const std::string& header, const std::string& data, int version = 1) {
  const size_t preamble = version == 1 ? 10 : 12;
  std::string text = header;
  text.append((64 - (preamble + text.size() + 1) % 64) % 64, ' ');
  text += '\n';
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(version);
  out += '\0';
  for (size_t i = 0; i < preamble - 8; ++i)
    out += static_cast<char>((text.size() >> (8 * i)) & 255);
  return out + text + data;
}

class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "gradserve-npy-test-XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string File(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

template <typename T>
void ExpectRoundTrip(DType dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
  Array array;
  array.dtype = dtype;
  array.shape = shape;
  array.data = Bytes(values);
  const std::string bytes = Serialize(array);
  // numpy's layout: the data starts at a multiple of 64, the header ends with '\n'.
  const size_t header_end =
      10 + (static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8);
  EXPECT_EQ(header_end % 64, 0u);
  EXPECT_EQ(bytes[header_end - 1], '\n');
  EXPECT_EQ(bytes.size(), header_end + values.size() * sizeof(T));

  std::string error;
  const std::optional<Array> parsed = Parse(bytes, "mem.npy", &error);
  ASSERT_TRUE(parsed) << error;
  EXPECT_EQ(parsed->dtype, dtype);
  EXPECT_EQ(parsed->shape, shape);
  EXPECT_EQ(parsed->data, array.data);

  TempDir dir;
  ASSERT_TRUE(Write(dir.File("a.npy"), array, &error)) << error;
  const std::optional<Array> read = Read(dir.File("a.npy"), &error);
  ASSERT_TRUE(read) << error;
  EXPECT_EQ(read->dtype, dtype);
  EXPECT_EQ(read->shape, shape);
  EXPECT_EQ(read->data, array.data);
}

TEST(Npy, RoundTripFloat32) {
  ExpectRoundTrip<float>(DType::kFloat32, {2, 3}, {1.5f, -2, 3, 4e-30f, 5, 6});
}

TEST(Npy, RoundTripFloat64) { ExpectRoundTrip<double>(DType::kFloat64, {3}, {0.1, -1e300, 3}); }

TEST(Npy, RoundTripInt64) {
  ExpectRoundTrip<int64_t>(DType::kInt64, {2, 1, 2}, {1, -2, INT64_MAX, INT64_MIN});
}

TEST(Npy, RoundTripInt32BoolScalarAndEmpty) {
  ExpectRoundTrip<int32_t>(DType::kInt32, {4}, {1, 2, 3, -4});
  ExpectRoundTrip<uint8_t>(DType::kBool, {2, 2}, {0, 1, 1, 0});
  ExpectRoundTrip<double>(DType::kFloat64, {}, {2.5});
  ExpectRoundTrip<float>(DType::kFloat32, {0, 5}, {});
}

TEST(Npy, WritesNumpysHeader) {
  Array array{DType::kFloat32, {4, 5}, std::string(80, '\0')};
  const std::string bytes = Serialize(array);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  EXPECT_EQ(bytes.substr(10, 59), "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 5), }");
  Array vector{DType::kInt64, {3}, std::string(24, '\0')};
  EXPECT_THAT(Serialize(vector), HasSubstr("'shape': (3,), }"));
}

TEST(Npy, ReadsVersions2And3) {
  const std::vector<double> values = {1, 2, 3};
  for (int version : {2, 3}) {
    std::string error;
    const std::optional<Array> array =
        Parse(MakeNpy("{\"descr\": \"<f8\", \"fortran_order\": False, \"shape\": (3,)}",
                      Bytes(values), version),
              "v.npy", &error);
    ASSERT_TRUE(array) << "version " << version << ": " << error;
    EXPECT_EQ(array->shape, std::vector<int64_t>{3});
    EXPECT_EQ(array->data, Bytes(values));
  }
}

TEST(Npy, FortranOrderIsReorderedToCOrder) {
  // [[1, 2, 3], [4, 5, 6]] stored column by column.
  std::string error;
  std::optional<Array> array =
      Parse(MakeNpy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                    Bytes<float>({1, 4, 2, 5, 3, 6})),
            "f.npy", &error);
  ASSERT_TRUE(array) << error;
  EXPECT_EQ(array->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(array->data, Bytes<float>({1, 2, 3, 4, 5, 6}));

  // Rank 3, shape (2, 3, 4): Fortran offset i + 2 j + 6 k holds the value 100 i + 10 j + k.
  std::vector<int64_t> fortran(24), c_order(24);
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      for (int64_t k = 0; k < 4; ++k) {
        fortran[i + 2 * j + 6 * k] = 100 * i + 10 * j + k;
        c_order[12 * i + 4 * j + k] = 100 * i + 10 * j + k;
      }
    }
  }
  array = Parse(
      MakeNpy("{'descr': '<i8', 'fortran_order': True, 'shape': (2, 3, 4), }", Bytes(fortran)),
      "f3.npy", &error);
  ASSERT_TRUE(array) << error;
  EXPECT_EQ(array->data, Bytes(c_order));
}

TEST(Npy, TruncatedDataNamesFileAndByteCounts) {
  const std::string full =
      MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 5), }", std::string(80, '\0'));
  TempDir dir;
  const std::string path = dir.File("short.npy");
  WriteFile(path, full.substr(0, full.size() - 40));
  std::string error;
  EXPECT_FALSE(Read(path, &error));
  EXPECT_THAT(error, HasSubstr(path));
  EXPECT_THAT(error, HasSubstr("truncated"));
  EXPECT_THAT(error, HasSubstr("needs 80 data bytes"));
  EXPECT_THAT(error, HasSubstr("only 40 are present"));

  // Cut inside the header, and inside the preamble.
  for (size_t size : {size_t{0}, size_t{7}, size_t{9}, size_t{40}}) {
    EXPECT_FALSE(Parse(full.substr(0, size), "cut.npy", &error)) << size;
    EXPECT_THAT(error, HasSubstr("cut.npy: truncated")) << size;
  }
}

TEST(Npy, TrailingBytesAreRefused) {
  std::string error;
  EXPECT_FALSE(Parse(
      MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", std::string(12, '\0')),
      "long.npy", &error));
  EXPECT_THAT(error, HasSubstr("more than one array"));
}

TEST(Npy, BadMagic) {
  std::string bytes =
      MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", std::string(4, '\0'));
  bytes[1] = 'X';
  std::string error;
  EXPECT_FALSE(Parse(bytes, "bad.npy", &error));
  EXPECT_THAT(error, HasSubstr("bad.npy: not a .npy file"));
  EXPECT_FALSE(Parse("PK\x03\x04 a zip file, e.g. .npz", "a.npz", &error));
  EXPECT_THAT(error, HasSubstr("not a .npy file"));

  bytes =
      MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", std::string(4, '\0'));
  bytes[6] = 4;
  EXPECT_FALSE(Parse(bytes, "v4.npy", &error));
  EXPECT_THAT(error, HasSubstr("unsupported .npy format version 4.0"));
}

TEST(Npy, RefusesBigEndianAndOtherDtypes) {
  std::string error;
  EXPECT_FALSE(Parse(
      MakeNpy("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", std::string(4, '\0')),
      "be.npy", &error));
  EXPECT_THAT(error, HasSubstr("big-endian"));
  EXPECT_THAT(error, HasSubstr("astype('<f4')"));
  EXPECT_FALSE(Parse(
      MakeNpy("{'descr': '<f2', 'fortran_order': False, 'shape': (1,), }", std::string(2, '\0')),
      "half.npy", &error));
  EXPECT_THAT(error, HasSubstr("dtype \"<f2\" is not supported"));
  EXPECT_FALSE(Parse(MakeNpy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                             std::string(4, '\0')),
                     "rec.npy", &error));
  EXPECT_THAT(error, HasSubstr("structured dtypes are not supported"));
}

TEST(Npy, GarbageHeadersAreErrorsNotCrashes) {
  const char* headers[] = {
      "",
      "garbage",
      "{",
      "{}",
      "{'descr': '<f4'}",
      "{'descr': '<f4', 'fortran_order': False}",
      "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': [1]}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (1,,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} trailing",
      "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}",
      "{'descr: '<f4', 'fortran_order': False, 'shape': (1,)}",
      "{'descr': '<f4\\x', 'fortran_order': False, 'shape': (1,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
      "\x01\x02\xff\xfe{}}}(((",
  };
  for (const char* header : headers) {
    std::string error;
    EXPECT_FALSE(Parse(MakeNpy(header, std::string(4, '\0')), "g.npy", &error)) << header;
    EXPECT_THAT(error, HasSubstr("g.npy: ")) << header;
  }
}

TEST(Npy, HugeShapesAreCheckedAgainstTheFileBeforeAllocating) {
  std::string error;
  // 2^60 elements: more than any file here holds, and a product that overflows.
  EXPECT_FALSE(Parse(MakeNpy("{'descr': '<f8', 'fortran_order': False, 'shape': (1073741824, "
                             "1073741824), }",
                             std::string(16, '\0')),
                     "huge.npy", &error));
  EXPECT_THAT(error, HasSubstr("truncated"));
  EXPECT_FALSE(
      Parse(MakeNpy("{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, "
                    "4611686018427387904, 4), }",
                    std::string(16, '\0')),
            "overflow.npy", &error));
  EXPECT_THAT(error, HasSubstr("too large"));
  // A version 2.0 header length of 4 GiB - 1 is refused before the header is read.
  std::string bytes("\x93NUMPY\x02\x00\xff\xff\xff\xff{}", 14);
  EXPECT_FALSE(Parse(bytes, "len.npy", &error));
  EXPECT_THAT(error, HasSubstr("corrupt"));
  TempDir dir;
  WriteFile(dir.File("len.npy"), bytes);
  EXPECT_FALSE(Read(dir.File("len.npy"), &error));
  EXPECT_THAT(error, HasSubstr("corrupt"));
}

TEST(Npy, RandomCorruptionNeverCrashes) {
  const std::string valid = MakeNpy("{'descr': '<i8', 'fortran_order': True, 'shape': (2, 3), }",
                                    Bytes<int64_t>({1, 2, 3, 4, 5, 6}));
  std::mt19937 rng(1);
  int parsed = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    std::string bytes = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<char>(rng());
          break;
        case 1:
          bytes.resize(at);
          break;
        default:
          bytes.insert(at, 1, "0123456789(),' "[rng() % 15]);
      }
      if (bytes.empty()) break;
    }
    std::string error;
    const std::optional<Array> array = Parse(bytes, "fuzz.npy", &error);
    if (array) {
      ++parsed;
      EXPECT_EQ(array->data.size(),
                static_cast<size_t>(array->ElementCount() * ItemSize(array->dtype)));
    } else {
      EXPECT_FALSE(error.empty());
    }
  }
  EXPECT_GT(parsed, 0);  // Edits to the padding or the data leave a valid file.
}

TEST(Npy, MissingFileNamesThePath) {
  std::string error;
  EXPECT_FALSE(Read("/nonexistent/x.npy", &error));
  EXPECT_THAT(error, HasSubstr("/nonexistent/x.npy: cannot open"));
  Array array{DType::kFloat32, {1}, std::string(4, '\0')};
  EXPECT_FALSE(Write("/nonexistent/y.npy", array, &error));
  EXPECT_THAT(error, HasSubstr("/nonexistent/y.npy: cannot create"));
}

}  // namespace
}  // namespace gradserve::client::npy
