#include "client/compute_command.h"

#include <absl/status/status.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <ostream>
#include <set>
#include <sstream>
#include <utility>

#include "client/npy.h"

namespace gradserve::client::compute {

namespace {

// One NAME=FILE argument and what was read from it.
struct NamedFile {
  std::string flag;
  std::string name;
  std::string path;
  npy::Array array;
};

bool SplitNamedFile(const std::string& flag, const std::string& text, NamedFile* out,
                    std::string* error) {
  const size_t equals = text.find('=');
  if (equals == std::string::npos || equals == 0 || equals + 1 == text.size()) {
    *error = flag + " \"" + text + "\": expected NAME=FILE.npy";
    return false;
  }
  out->flag = flag;
  out->name = text.substr(0, equals);
  out->path = text.substr(equals + 1);
  return true;
}

bool IsFloating(npy::DType dtype) {
  return dtype == npy::DType::kFloat32 || dtype == npy::DType::kFloat64;
}

v1::DType WireDType(npy::DType dtype) {
  switch (dtype) {
    case npy::DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case npy::DType::kFloat64:
      return v1::DTYPE_FLOAT64;
    case npy::DType::kInt32:
      return v1::DTYPE_INT32;
    case npy::DType::kInt64:
      return v1::DTYPE_INT64;
    case npy::DType::kBool:
      return v1::DTYPE_BOOL;
    case npy::DType::kUint8:
      break;  // refused when read
  }
  return v1::DTYPE_UNSPECIFIED;
}

std::optional<npy::DType> NpyDType(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return npy::DType::kFloat32;
    case v1::DTYPE_FLOAT64:
      return npy::DType::kFloat64;
    case v1::DTYPE_INT32:
      return npy::DType::kInt32;
    case v1::DTYPE_INT64:
      return npy::DType::kInt64;
    case v1::DTYPE_BOOL:
      return npy::DType::kBool;
    default:
      return std::nullopt;
  }
}

template <typename From, typename To>
std::string ConvertElements(const std::string& data) {
  const size_t count = data.size() / sizeof(From);
  std::string out(count * sizeof(To), '\0');
  for (size_t i = 0; i < count; ++i) {
    From value;
    std::memcpy(&value, data.data() + i * sizeof(From), sizeof(From));
    const To converted = static_cast<To>(value);
    std::memcpy(out.data() + i * sizeof(To), &converted, sizeof(To));
  }
  return out;
}

// The floating arrays are converted to the request's dtype (numpy writes float64 by default; a
// float32 model then needs no second copy of the data on the user's side).
void ConvertFloating(npy::DType to, npy::Array* array) {
  if (!IsFloating(array->dtype) || array->dtype == to) return;
  array->data = to == npy::DType::kFloat32 ? ConvertElements<double, float>(array->data)
                                           : ConvertElements<float, double>(array->data);
  array->dtype = to;
}

v1::Tensor ToTensor(const npy::Array& array) {
  v1::Tensor tensor;
  tensor.set_dtype(WireDType(array.dtype));
  for (const int64_t dim : array.shape) tensor.add_shape(dim);
  tensor.set_data(array.data);
  return tensor;
}

// The response's tensor as an array; nullopt if its dtype is unknown or its bytes do not match
// its shape.
std::optional<npy::Array> FromTensor(const v1::Tensor& tensor) {
  const std::optional<npy::DType> dtype = NpyDType(tensor.dtype());
  if (!dtype) return std::nullopt;
  npy::Array array;
  array.dtype = *dtype;
  uint64_t bytes = static_cast<uint64_t>(npy::ItemSize(*dtype));
  for (const int64_t dim : tensor.shape()) {
    if (dim < 0 || __builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes)) {
      return std::nullopt;
    }
    array.shape.push_back(dim);
  }
  if (bytes != tensor.data().size()) return std::nullopt;
  array.data = tensor.data();
  return array;
}

double Norm(const npy::Array& array) {
  double sum = 0;
  const int64_t count = array.ElementCount();
  for (int64_t i = 0; i < count; ++i) {
    double value = 0;
    if (array.dtype == npy::DType::kFloat32) {
      float f;
      std::memcpy(&f, array.data.data() + i * sizeof(float), sizeof(float));
      value = f;
    } else if (array.dtype == npy::DType::kFloat64) {
      std::memcpy(&value, array.data.data() + i * sizeof(double), sizeof(double));
    } else {
      return std::nan("");
    }
    sum += value * value;
  }
  return std::sqrt(sum);
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

bool SetLoss(const ComputeOptions& options, v1::Loss* loss, std::string* error) {
  if (options.loss == "mse") {
    loss->mutable_mse();
  } else if (options.loss == "l1") {
    loss->mutable_l1();
  } else if (options.loss == "huber") {
    loss->mutable_huber();
  } else if (options.loss == "cross_entropy") {
    loss->mutable_cross_entropy();
  } else if (options.loss == "bce_with_logits") {
    loss->mutable_bce_with_logits();
  } else if (options.loss == "external") {
    loss->mutable_external();
  } else {
    *error = "--loss " + options.loss + ": unknown loss";
    return false;
  }
  loss->set_reduction(options.reduction == "sum" ? v1::REDUCTION_SUM : v1::REDUCTION_MEAN);
  return true;
}

// Writes every array under its NpyFileName in `dir`, after checking that no two names map to
// the same file (so that nothing is overwritten silently).
bool WriteArrays(const std::filesystem::path& dir,
                 const std::vector<std::pair<std::string, npy::Array>>& arrays,
                 std::string* error) {
  std::map<std::string, std::string> by_file;
  for (const auto& [name, array] : arrays) {
    const auto [it, inserted] = by_file.emplace(NpyFileName(name), name);
    if (!inserted) {
      *error = "\"" + it->second + "\" and \"" + name + "\" would both be written to " +
               (dir / it->first).string();
      return false;
    }
  }
  std::error_code code;
  std::filesystem::create_directories(dir, code);
  if (code) {
    *error = dir.string() + ": cannot create the directory: " + code.message();
    return false;
  }
  for (const auto& [name, array] : arrays) {
    if (!npy::Write((dir / NpyFileName(name)).string(), array, error)) return false;
  }
  return true;
}

}  // namespace

CLI::App* AddComputeCommand(CLI::App& app, ComputeOptions* options) {
  CLI::App* compute = app.add_subcommand(
      "compute",
      "ComputeGradients on an ONNX model with the batch in .npy files; prints the loss and each "
      "gradient's shape and norm, and with --out writes the gradients as .npy files");
  compute->add_option("--onnx", options->onnx_path, "the model, as torch.onnx.export wrote it")
      ->required()
      ->check(CLI::ExistingFile);
  compute
      ->add_option("--input", options->inputs,
                   "NAME=FILE.npy: the graph input NAME of the batch (repeat for each input)")
      ->required()
      ->type_name("NAME=FILE");
  compute
      ->add_option("--loss-target", options->loss_target_path,
                   "FILE.npy: the loss target (for --loss external: dL/d(loss output))")
      ->required()
      ->type_name("FILE");
  compute
      ->add_option("--loss", options->loss,
                   "loss applied to the model's output against the loss target")
      ->check(CLI::IsMember({"mse", "l1", "huber", "cross_entropy", "bce_with_logits", "external"}))
      ->capture_default_str();
  compute->add_option("--reduction", options->reduction, "how the loss is reduced")
      ->check(CLI::IsMember({"mean", "sum"}))
      ->capture_default_str();
  compute
      ->add_option("--dtype", options->dtype,
                   "dtype to compute in; floating .npy files are converted to it (default: their "
                   "own dtype, which must then agree; the model file's if there are none)")
      ->check(CLI::IsMember({"float32", "float64"}));
  compute
      ->add_option("--out", options->out_dir,
                   "directory (created if missing) for DIR/<initializer name>.npy per "
                   "gradient, '/' in a name written as '_', and DIR/loss.txt")
      ->type_name("DIR");
  compute
      ->add_option("--param", options->params,
                   "NAME=FILE.npy: use these values for initializer NAME instead of the file's "
                   "(repeatable)")
      ->type_name("NAME=FILE");
  compute->add_flag("--return-output", options->return_output,
                    "print the graph outputs' shapes; with --out, write them to "
                    "DIR/outputs/<output name>.npy");
  compute
      ->add_option("--frozen", options->frozen,
                   "initializer held constant: no gradient computed or returned (repeatable)")
      ->type_name("NAME");
  compute->add_flag("--disable-dropout", options->disable_dropout,
                    "run the file's Dropout nodes as identity");
  compute
      ->add_option("--dropout-seed", options->dropout_seed,
                   "mixed into the Dropout masks: same seed, same masks")
      ->capture_default_str();
  compute
      ->add_option("--loss-output", options->loss_output,
                   "graph output the loss reads (default: the file's only output)")
      ->type_name("NAME");
  compute
      ->add_option("--loss-target-name", options->loss_target_name,
                   "name the loss target is sent under (default: \"target\"); must not be a "
                   "name the file uses")
      ->type_name("NAME");
  compute
      ->add_option("--batch-input", options->batch_inputs,
                   "graph input that also has an initializer (keep_initializers_as_inputs "
                   "exports) to send as part of the batch (repeatable)")
      ->type_name("NAME");
  return compute;
}

std::string NpyFileName(std::string_view name) {
  std::string file(name);
  for (char& c : file) {
    if (c == '/') c = '_';
  }
  return file + ".npy";
}

bool BuildRequest(const ComputeOptions& options, v1::ComputeGradientsRequest* request,
                  std::string* error) {
  std::string onnx;
  {
    std::ifstream in(options.onnx_path, std::ios::binary);
    std::ostringstream bytes;
    bytes << in.rdbuf();
    if (!in || bytes.str().empty()) {
      *error = options.onnx_path + ": cannot read the ONNX file";
      return false;
    }
    onnx = std::move(bytes).str();
  }

  const std::string target_name =
      options.loss_target_name.empty() ? "target" : options.loss_target_name;
  std::vector<NamedFile> inputs, params;
  for (const std::string& text : options.inputs) {
    if (!SplitNamedFile("--input", text, &inputs.emplace_back(), error)) return false;
  }
  inputs.push_back({"--loss-target", target_name, options.loss_target_path, {}});
  for (const std::string& text : options.params) {
    if (!SplitNamedFile("--param", text, &params.emplace_back(), error)) return false;
  }
  for (std::vector<NamedFile>* files : {&inputs, &params}) {
    std::set<std::string> names;
    for (const NamedFile& file : *files) {
      if (!names.insert(file.name).second) {
        *error = file.flag + " " + file.name + "=" + file.path + ": \"" + file.name +
                 "\" is given twice" +
                 (file.name == target_name ? " (it is also the loss target's name)" : "");
        return false;
      }
    }
  }

  // One floating dtype for the whole request, as the service requires.
  std::optional<npy::DType> dtype;
  if (!options.dtype.empty()) {
    dtype = options.dtype == "float64" ? npy::DType::kFloat64 : npy::DType::kFloat32;
  }
  const NamedFile* first_floating = nullptr;
  for (std::vector<NamedFile>* files : {&inputs, &params}) {
    for (NamedFile& file : *files) {
      std::optional<npy::Array> array = npy::Read(file.path, error);
      if (!array) return false;
      if (array->dtype == npy::DType::kUint8) {
        *error = file.path +
                 ": uint8 is not a dtype gradserve computes with (float32, float64; "
                 "int32, int64 for class targets and token ids; bool)";
        return false;
      }
      file.array = std::move(*array);
      if (options.dtype.empty() && IsFloating(file.array.dtype)) {
        if (first_floating != nullptr && first_floating->array.dtype != file.array.dtype) {
          *error = "the .npy files mix " +
                   std::string(npy::DTypeName(first_floating->array.dtype)) + " (" +
                   first_floating->path + ") and " + npy::DTypeName(file.array.dtype) + " (" +
                   file.path + "): choose one with --dtype";
          return false;
        }
        if (first_floating == nullptr) first_floating = &file;
      }
    }
  }
  if (first_floating != nullptr) dtype = first_floating->array.dtype;

  v1::Model* model = request->mutable_model();
  if (!SetLoss(options, model->mutable_loss(), error)) return false;
  v1::OnnxModel* onnx_model = model->mutable_onnx();
  onnx_model->set_model(std::move(onnx));
  if (dtype) onnx_model->set_dtype(WireDType(*dtype));
  onnx_model->set_loss_output(options.loss_output);
  onnx_model->set_loss_target(options.loss_target_name);
  for (const std::string& name : options.frozen) onnx_model->add_frozen(name);
  for (const std::string& name : options.batch_inputs) onnx_model->add_batch_inputs(name);
  onnx_model->set_disable_dropout(options.disable_dropout);
  for (NamedFile& file : inputs) {
    if (dtype) ConvertFloating(*dtype, &file.array);
    v1::NamedTensor* tensor = request->add_graph_inputs();
    tensor->set_name(file.name);
    *tensor->mutable_tensor() = ToTensor(file.array);
  }
  for (NamedFile& file : params) {
    if (dtype) ConvertFloating(*dtype, &file.array);
    v1::NamedTensor* tensor = request->add_named_parameters();
    tensor->set_name(file.name);
    *tensor->mutable_tensor() = ToTensor(file.array);
  }
  request->mutable_options()->set_return_output(options.return_output);
  request->mutable_options()->set_dropout_seed(options.dropout_seed);
  return true;
}

int RunCompute(GradientClient& client, const ComputeOptions& options, std::ostream& out,
               std::ostream& err) {
  std::string error;
  v1::ComputeGradientsRequest request;
  if (!BuildRequest(options, &request, &error)) {
    err << "gradclient: " << error << "\n";
    return 2;
  }
  v1::ComputeGradientsResponse response;
  if (const grpc::Status status = client.ComputeGradients(request, &response); !status.ok()) {
    // absl::StatusCode and grpc::StatusCode share the canonical numbering and names.
    err << "gradclient: ComputeGradients failed: "
        << absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())) << ": "
        << status.error_message() << "\n";
    return 1;
  }

  std::vector<std::pair<std::string, npy::Array>> gradients, outputs;
  for (const auto& [from, to] : {std::pair{&response.named_gradients(), &gradients},
                                 std::pair{&response.outputs(), &outputs}}) {
    for (const v1::NamedTensor& named : *from) {
      std::optional<npy::Array> array = FromTensor(named.tensor());
      if (!array) {
        err << "gradclient: the server's tensor \"" << named.name()
            << "\" is malformed (unknown dtype, or data not matching its shape)\n";
        return 1;
      }
      to->emplace_back(named.name(), std::move(*array));
    }
  }

  char line[64];
  std::snprintf(line, sizeof(line), "%.9g", response.loss());
  const std::string loss = line;
  out << "loss " << loss << " ("
      << (gradients.empty() ? "no gradients" : npy::DTypeName(gradients[0].second.dtype)) << ", "
      << gradients.size() << " gradients)\n";
  size_t name_width = 0, shape_width = 0;
  for (const auto& [name, array] : gradients) {
    name_width = std::max(name_width, name.size());
    shape_width = std::max(shape_width, ShapeText(array.shape).size());
  }
  for (const auto& [name, array] : gradients) {
    const std::string shape = ShapeText(array.shape);
    std::snprintf(line, sizeof(line), "norm %.6g", Norm(array));
    out << "  " << name << std::string(name_width - name.size(), ' ') << "  " << shape
        << std::string(shape_width - shape.size(), ' ') << "  " << line << "\n";
  }
  for (const auto& [name, array] : outputs) {
    out << "output " << name << "  " << ShapeText(array.shape) << "\n";
  }

  if (options.out_dir.empty()) return 0;
  const std::filesystem::path dir(options.out_dir);
  if (!WriteArrays(dir, gradients, &error) ||
      (!outputs.empty() && !WriteArrays(dir / "outputs", outputs, &error))) {
    err << "gradclient: " << error << "\n";
    return 1;
  }
  std::ofstream loss_file(dir / "loss.txt");
  std::snprintf(line, sizeof(line), "%.17g\n", response.loss());
  loss_file << line;
  loss_file.close();
  if (!loss_file) {
    err << "gradclient: " << (dir / "loss.txt").string() << ": write error\n";
    return 1;
  }
  out << "wrote " << gradients.size() << " gradients, "
      << (outputs.empty() ? "" : std::to_string(outputs.size()) + " outputs (outputs/), ")
      << "loss.txt to " << dir.string() << "\n";
  return 0;
}

}  // namespace gradserve::client::compute
