// NumPy .npy files (numpy.save / numpy.load), for `gradclient compute`: arrays of float32,
// float64, int32, int64, bool and uint8 (raw bytes), little-endian.
//
// Reading accepts format versions 1.0, 2.0 and 3.0 and both C and Fortran order (a Fortran-order
// file, e.g. np.save of a transposed array, is reordered to C order on reading). Big-endian
// dtypes, other dtypes, object arrays and malformed headers are refused with a message naming
// the file. The header is validated, and the element count it declares checked against the
// bytes the file holds, before any buffer is sized from it: a corrupt or hostile header can
// neither crash the reader nor make it allocate more than the file's own size.
#ifndef GRADSERVE_CLIENT_NPY_H_
#define GRADSERVE_CLIENT_NPY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace gradserve::client::npy {

enum class DType { kFloat32, kFloat64, kInt32, kInt64, kBool, kUint8 };

// "float32", "float64", "int32", "int64", "bool", "uint8".
const char* DTypeName(DType dtype);
// Bytes per element.
int64_t ItemSize(DType dtype);

struct Array {
  DType dtype = DType::kFloat32;
  // Empty for a 0-d array (one element).
  std::vector<int64_t> shape;
  // The elements in C (row-major) order, little-endian: ElementCount() * ItemSize(dtype) bytes.
  std::string data;

  int64_t ElementCount() const;
};

// Parses the bytes of a .npy file; `name` (usually the path) starts every error message.
// nullopt with the reason in *error if the bytes are not a .npy file this reader supports.
// REQUIRES: error != nullptr.
std::optional<Array> Parse(std::string_view bytes, const std::string& name, std::string* error);

// Reads the .npy file at `path`, as Parse does, but reads the data only once the header and the
// file's size agree.
std::optional<Array> Read(const std::string& path, std::string* error);

// The .npy bytes for `array` (format 1.0, or 2.0 if the header needs it; C order; the header
// padded so that the data starts at a multiple of 64 bytes, as numpy writes it).
// REQUIRES: array.data.size() == array.ElementCount() * ItemSize(array.dtype).
std::string Serialize(const Array& array);

// Writes Serialize(array) to `path`, replacing it. false with the reason in *error on failure.
bool Write(const std::string& path, const Array& array, std::string* error);

}  // namespace gradserve::client::npy

#endif  // GRADSERVE_CLIENT_NPY_H_
