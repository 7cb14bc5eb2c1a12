#include "client/npy.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>

namespace gradserve::client::npy {

// The .npy data and the wire Tensor are both little-endian: bytes are copied as they are.
static_assert(std::endian::native == std::endian::little, "npy.cc assumes a little-endian host");

namespace {

constexpr std::string_view kMagic("\x93NUMPY", 6);
// Far above any real header (numpy's own reader refuses headers over 10000 bytes by default),
// far below an allocation that could hurt: a version 2.0 length field can claim 4 GiB.
constexpr uint32_t kMaxHeaderBytes = uint32_t{1} << 20;
// numpy 2's NPY_MAXDIMS; a deeper "shape" is garbage.
constexpr size_t kMaxRank = 64;

struct Preamble {
  int major_version = 0;
  // Where the header text starts and how long it is.
  size_t header_offset = 0;
  uint32_t header_bytes = 0;
};

// Where the data is and what it holds, from a validated header.
struct Layout {
  DType dtype = DType::kFloat32;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  size_t data_offset = 0;
  size_t data_bytes = 0;
};

// Up to `max` bytes of `text` with anything unprintable escaped, for error messages that quote a
// header which may be binary garbage.
std::string Quote(std::string_view text, size_t max = 80) {
  std::string out = "\"";
  for (size_t i = 0; i < text.size() && i < max; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  if (text.size() > max) out += "...";
  return out + "\"";
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

bool Fail(const std::string& name, const std::string& what, std::string* error) {
  *error = name + ": " + what;
  return false;
}

bool ParsePreamble(std::string_view bytes, const std::string& name, Preamble* preamble,
                   std::string* error) {
  if (bytes.substr(0, kMagic.size()) != kMagic.substr(0, bytes.size())) {
    return Fail(name,
                "not a .npy file: it does not start with \"\\x93NUMPY\" (it starts with " +
                    Quote(bytes.substr(0, 8)) + ")",
                error);
  }
  if (bytes.size() < 8) {
    return Fail(
        name,
        "truncated: " + std::to_string(bytes.size()) + " bytes, a .npy preamble has at least 10",
        error);
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  const int minor = static_cast<unsigned char>(bytes[7]);
  if (minor != 0 || major < 1 || major > 3) {
    return Fail(name,
                "unsupported .npy format version " + std::to_string(major) + "." +
                    std::to_string(minor) + " (supported: 1.0, 2.0, 3.0)",
                error);
  }
  // Version 1.0 has a 2-byte header length, 2.0 and 3.0 (3.0: UTF-8 header) a 4-byte one.
  const size_t length_bytes = major == 1 ? 2 : 4;
  if (bytes.size() < 8 + length_bytes) {
    return Fail(name,
                "truncated: " + std::to_string(bytes.size()) + " bytes, a version " +
                    std::to_string(major) + ".0 preamble has " + std::to_string(8 + length_bytes),
                error);
  }
  uint32_t length = 0;
  for (size_t i = 0; i < length_bytes; ++i) {
    length |= uint32_t{static_cast<unsigned char>(bytes[8 + i])} << (8 * i);
  }
  if (length > kMaxHeaderBytes) {
    return Fail(name,
                "the header claims " + std::to_string(length) + " bytes (at most " +
                    std::to_string(kMaxHeaderBytes) + " accepted): corrupt file?",
                error);
  }
  preamble->major_version = major;
  preamble->header_offset = 8 + length_bytes;
  preamble->header_bytes = length;
  return true;
}

// The header is the repr of a Python dict, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (4, 5), }
// padded with spaces and ended by '\n'. This reads exactly that grammar (either quote, any
// whitespace, an optional trailing comma), not Python: anything else is an error naming the
// byte where it went wrong.
class HeaderParser {
 public:
  explicit HeaderParser(std::string_view text) : text_(text) {}

  bool Parse(std::string* descr, bool* fortran_order, std::vector<int64_t>* shape,
             std::string* what) {
    bool seen_descr = false, seen_fortran = false, seen_shape = false;
    SkipSpace();
    if (!Consume('{')) return Expected("'{'", what);
    while (true) {
      SkipSpace();
      if (Consume('}')) break;
      std::string key;
      if (!ParseString(&key)) return Expected("a quoted key or '}'", what);
      SkipSpace();
      if (!Consume(':')) return Expected("':'", what);
      SkipSpace();
      bool* seen = nullptr;
      if (key == "descr") {
        seen = &seen_descr;
        if (!ParseString(descr)) {
          return Expected("a dtype string ('<f4', ...; structured dtypes are not supported)", what);
        }
      } else if (key == "fortran_order") {
        seen = &seen_fortran;
        if (ConsumeWord("True")) {
          *fortran_order = true;
        } else if (ConsumeWord("False")) {
          *fortran_order = false;
        } else {
          return Expected("True or False", what);
        }
      } else if (key == "shape") {
        seen = &seen_shape;
        if (!ParseShape(shape, what)) return false;
      } else {
        *what = "unexpected key " + Quote(key) + " (a .npy header has descr, fortran_order, shape)";
        return false;
      }
      if (*seen) {
        *what = "key " + Quote(key) + " appears twice";
        return false;
      }
      *seen = true;
      SkipSpace();
      if (Consume(',')) continue;
      if (Consume('}')) break;
      return Expected("',' or '}'", what);
    }
    SkipSpace();
    if (pos_ != text_.size()) return Expected("only padding after '}'", what);
    if (!seen_descr || !seen_fortran || !seen_shape) {
      *what = std::string("missing key '") +
              (!seen_descr     ? "descr"
               : !seen_fortran ? "fortran_order"
                               : "shape") +
              "'";
      return false;
    }
    return true;
  }

 private:
  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  bool Consume(char c) {
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ConsumeWord(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }
  // A '...' or "..." literal without escapes (no valid key or supported dtype has any).
  bool ParseString(std::string* out) {
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) return false;
    const char quote = text_[pos_];
    const size_t end = text_.find(quote, pos_ + 1);
    if (end == std::string_view::npos) return false;
    const std::string_view body = text_.substr(pos_ + 1, end - pos_ - 1);
    if (body.find('\\') != std::string_view::npos) return false;
    *out = std::string(body);
    pos_ = end + 1;
    return true;
  }
  // "()", "(5,)", "(4, 5)", "(4, 5,)".
  bool ParseShape(std::vector<int64_t>* shape, std::string* what) {
    shape->clear();
    if (!Consume('(')) return Expected("a shape tuple '(...)'", what);
    SkipSpace();
    if (Consume(')')) return true;
    while (true) {
      const size_t start = pos_;
      int64_t dim = 0;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
        // 2^62 bounds every dimension; the product is checked against the file later.
        if (dim > (int64_t{1} << 62) / 10) {
          *what = "shape dimension at byte " + std::to_string(start) + " is too large";
          return false;
        }
        dim = dim * 10 + (text_[pos_] - '0');
        ++pos_;
      }
      if (pos_ == start) return Expected("a non-negative integer dimension", what);
      if (shape->size() == kMaxRank) {
        *what = "shape has more than " + std::to_string(kMaxRank) + " dimensions";
        return false;
      }
      shape->push_back(dim);
      SkipSpace();
      if (Consume(')')) return true;
      if (!Consume(',')) return Expected("',' or ')' in the shape", what);
      SkipSpace();
      if (Consume(')')) return true;
    }
  }
  bool Expected(const std::string& thing, std::string* what) {
    *what = "expected " + thing + " at byte " + std::to_string(pos_) + " of the header, found " +
            (pos_ < text_.size() ? Quote(text_.substr(pos_), 16) : std::string("its end"));
    return false;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

bool ParseDescr(const std::string& descr, DType* dtype, std::string* what) {
  static constexpr std::pair<std::string_view, DType> kSupported[] = {
      {"<f4", DType::kFloat32}, {"<f8", DType::kFloat64}, {"<i4", DType::kInt32},
      {"<i8", DType::kInt64},   {"|b1", DType::kBool},    {"|u1", DType::kUint8}};
  for (const auto& [text, value] : kSupported) {
    if (descr == text) {
      *dtype = value;
      return true;
    }
  }
  if (!descr.empty() && descr[0] == '>') {
    *what = "big-endian dtype " + Quote(descr) + " is not supported (save a.astype('<" +
            descr.substr(1) + "') instead)";
  } else {
    *what = "dtype " + Quote(descr) + " is not supported (supported: '<f4' float32, '<f8' " +
            "float64, '<i4' int32, '<i8' int64, '|b1' bool, '|u1' uint8)";
  }
  return false;
}

// Validates the header text and sizes the data against a file of `file_bytes` bytes. Nothing is
// allocated from the header's numbers: the shape's byte count is compared with what the file
// holds, with overflow checked.
bool ParseLayout(const Preamble& preamble, std::string_view header, size_t file_bytes,
                 const std::string& name, Layout* layout, std::string* error) {
  std::string descr, what;
  if (!HeaderParser(header).Parse(&descr, &layout->fortran_order, &layout->shape, &what)) {
    return Fail(name, "malformed .npy header (" + what + "): " + Quote(header), error);
  }
  if (!ParseDescr(descr, &layout->dtype, &what)) return Fail(name, what, error);
  uint64_t bytes = static_cast<uint64_t>(ItemSize(layout->dtype));
  for (const int64_t dim : layout->shape) {
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes)) {
      return Fail(name, "shape " + ShapeString(layout->shape) + " is too large", error);
    }
  }
  layout->data_offset = preamble.header_offset + preamble.header_bytes;
  const size_t present = file_bytes - layout->data_offset;
  const std::string declared = "shape " + ShapeString(layout->shape) + " " +
                               DTypeName(layout->dtype) + " needs " + std::to_string(bytes) +
                               " data bytes";
  if (bytes > present) {
    return Fail(name,
                "truncated: " + declared + " after the " + std::to_string(layout->data_offset) +
                    "-byte header, but only " + std::to_string(present) + " are present",
                error);
  }
  if (bytes < present) {
    // numpy.load would ignore them, but they mean this is not the file the header describes
    // (or several arrays were saved into one file).
    return Fail(name,
                declared + ", but " + std::to_string(present) +
                    " follow the header (more than one array in the file?)",
                error);
  }
  layout->data_bytes = bytes;
  return true;
}

// `data` holds the elements in the layout's order; the result holds them in C order.
Array MakeArray(Layout layout, std::string data) {
  Array array;
  array.dtype = layout.dtype;
  array.shape = std::move(layout.shape);
  const size_t rank = array.shape.size();
  const int64_t count = array.ElementCount();
  if (!layout.fortran_order || rank < 2 || count == 0) {
    array.data = std::move(data);
    return array;
  }
  // Fortran order: element (i0, ..., in-1) is at i0 + d0 (i1 + d1 (i2 + ...)). Walk the C order
  // with an odometer, moving the Fortran offset along with it.
  const size_t item = static_cast<size_t>(ItemSize(array.dtype));
  std::vector<int64_t> stride(rank, 1);
  for (size_t k = 1; k < rank; ++k) stride[k] = stride[k - 1] * array.shape[k - 1];
  std::vector<int64_t> index(rank, 0);
  array.data.resize(data.size());
  int64_t source = 0;
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(array.data.data() + i * item, data.data() + source * item, item);
    for (size_t k = rank; k-- > 0;) {
      source += stride[k];
      if (++index[k] < array.shape[k]) break;
      source -= stride[k] * array.shape[k];
      index[k] = 0;
    }
  }
  return array;
}

}  // namespace

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kBool:
      return "bool";
    case DType::kUint8:
      return "uint8";
  }
  return "?";
}

int64_t ItemSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
    case DType::kBool:
    case DType::kUint8:
      return 1;
  }
  return 1;
}

int64_t Array::ElementCount() const {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;
  return count;
}

std::optional<Array> Parse(std::string_view bytes, const std::string& name, std::string* error) {
  Preamble preamble;
  if (!ParsePreamble(bytes.substr(0, 12), name, &preamble, error)) return std::nullopt;
  if (bytes.size() < preamble.header_offset + preamble.header_bytes) {
    Fail(name,
         "truncated: the header needs " +
             std::to_string(preamble.header_offset + preamble.header_bytes) +
             " bytes, the file has " + std::to_string(bytes.size()),
         error);
    return std::nullopt;
  }
  Layout layout;
  if (!ParseLayout(preamble, bytes.substr(preamble.header_offset, preamble.header_bytes),
                   bytes.size(), name, &layout, error)) {
    return std::nullopt;
  }
  return MakeArray(std::move(layout),
                   std::string(bytes.substr(layout.data_offset, layout.data_bytes)));
}

std::optional<Array> Read(const std::string& path, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    Fail(path, std::string("cannot open: ") + std::strerror(errno), error);
    return std::nullopt;
  }
  in.seekg(0, std::ios::end);
  const std::streamoff end = in.tellg();
  in.seekg(0, std::ios::beg);
  if (end < 0 || !in) {
    Fail(path, "cannot determine the file's size (not a regular file?)", error);
    return std::nullopt;
  }
  const size_t file_bytes = static_cast<size_t>(end);
  auto read = [&](size_t offset, size_t count, std::string* out) {
    out->resize(count);
    in.seekg(static_cast<std::streamoff>(offset));
    in.read(out->data(), static_cast<std::streamsize>(count));
    if (!in) Fail(path, "read error", error);
    return static_cast<bool>(in);
  };
  std::string preamble_bytes;
  if (!read(0, std::min<size_t>(file_bytes, 12), &preamble_bytes)) return std::nullopt;
  Preamble preamble;
  if (!ParsePreamble(preamble_bytes, path, &preamble, error)) return std::nullopt;
  if (file_bytes < preamble.header_offset + preamble.header_bytes) {
    Fail(path,
         "truncated: the header needs " +
             std::to_string(preamble.header_offset + preamble.header_bytes) +
             " bytes, the file has " + std::to_string(file_bytes),
         error);
    return std::nullopt;
  }
  std::string header;
  if (!read(preamble.header_offset, preamble.header_bytes, &header)) return std::nullopt;
  Layout layout;
  if (!ParseLayout(preamble, header, file_bytes, path, &layout, error)) return std::nullopt;
  std::string data;
  if (!read(layout.data_offset, layout.data_bytes, &data)) return std::nullopt;
  return MakeArray(std::move(layout), std::move(data));
}

std::string Serialize(const Array& array) {
  static constexpr const char* kDescr[] = {"<f4", "<f8", "<i4", "<i8", "|b1", "|u1"};
  std::string header = std::string("{'descr': '") + kDescr[static_cast<int>(array.dtype)] +
                       "', 'fortran_order': False, 'shape': " + ShapeString(array.shape) + ", }";
  // numpy aligns the data to 64 bytes (so that it can be memory-mapped for any dtype) and ends
  // the padded header with '\n'; version 2.0 only when the length does not fit 2 bytes.
  const bool version2 = header.size() + 1 + 10 + 63 > 0xffff;
  const size_t preamble = version2 ? 12 : 10;
  header.append((64 - (preamble + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::string out(kMagic);
  out += static_cast<char>(version2 ? 2 : 1);
  out += '\0';
  const size_t length = header.size();
  for (size_t i = 0; i < preamble - 8; ++i) out += static_cast<char>((length >> (8 * i)) & 0xff);
  out += header;
  out += array.data;
  return out;
}

bool Write(const std::string& path, const Array& array, std::string* error) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Fail(path, std::string("cannot create: ") + std::strerror(errno), error);
  const std::string bytes = Serialize(array);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return Fail(path, std::string("write error: ") + std::strerror(errno), error);
  return true;
}

}  // namespace gradserve::client::npy
