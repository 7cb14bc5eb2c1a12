#include "client/compute_command.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cerrno>
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

enum class ModelKind { kChain, kGraph, kOnnx };

ModelKind KindOf(const v1::Model& model) {
  if (model.has_onnx()) return ModelKind::kOnnx;
  if (model.has_graph()) return ModelKind::kGraph;
  return ModelKind::kChain;
}

bool ReadWholeFile(const std::string& path, const char* what, std::string* out,
                   std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = path + ": cannot open the " + what + ": " + std::strerror(errno);
    return false;
  }
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) {
    *error = path + ": cannot read the " + what;
    return false;
  }
  *out = std::move(bytes).str();
  return true;
}

// Keeps the first error with its position (1-based, as editors count).
class FirstParseError : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (first_.empty()) {
      first_ = "line " + std::to_string(line + 1) + " column " + std::to_string(column + 1) + ": " +
               message;
    }
  }
  const std::string& first() const { return first_; }

 private:
  std::string first_;
};

// A loss kind by its --loss name; the reduction is left alone.
bool SetLossKind(const std::string& name, v1::Loss* loss, std::string* error) {
  if (name == "mse") {
    loss->mutable_mse();
  } else if (name == "l1") {
    loss->mutable_l1();
  } else if (name == "huber") {
    loss->mutable_huber();
  } else if (name == "cross_entropy") {
    loss->mutable_cross_entropy();
  } else if (name == "bce_with_logits") {
    loss->mutable_bce_with_logits();
  } else if (name == "external") {
    loss->mutable_external();
  } else {
    *error = "--loss " + name + ": unknown loss";
    return false;
  }
  return true;
}

bool SetCheckpointing(const std::string& text, v1::Checkpointing* checkpointing,
                      std::string* error) {
  auto number = [&](std::string_view digits, int64_t* value) {
    if (digits.empty() || digits.size() > 18 ||
        digits.find_first_not_of("0123456789") != std::string_view::npos) {
      *error = "--checkpoint " + text + ": expected none, sqrt, every:K or budget:BYTES";
      return false;
    }
    *value = std::stoll(std::string(digits));
    return true;
  };
  int64_t value = 0;
  if (text == "none") {
    checkpointing->set_mode(v1::Checkpointing::MODE_NONE);
  } else if (text == "sqrt") {
    checkpointing->set_mode(v1::Checkpointing::MODE_SQRT);
  } else if (text.rfind("every:", 0) == 0) {
    if (!number(std::string_view(text).substr(6), &value)) return false;
    checkpointing->set_mode(v1::Checkpointing::MODE_EVERY_K);
    checkpointing->set_every_k(value);
  } else if (text.rfind("budget:", 0) == 0) {
    if (!number(std::string_view(text).substr(7), &value)) return false;
    checkpointing->set_mode(v1::Checkpointing::MODE_MEMORY_BUDGET);
    checkpointing->set_memory_budget_bytes(value);
  } else {
    return number("", &value);
  }
  return true;
}

// SplitMix64: a seed names the same parameters on every platform and standard library, which
// std::uniform_real_distribution does not promise.
uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// torch.nn.Linear's default initialization (kaiming_uniform_ with a = sqrt(5) for the weight, and
// the bias likewise) draws both from U(-1/sqrt(in_features), 1/sqrt(in_features)): the same
// scale, so a model initialized here trains as a fresh PyTorch one would, though not with
// PyTorch's numbers.
npy::Array InitLinearParameter(const std::vector<int64_t>& shape, int64_t in_features,
                               npy::DType dtype, uint64_t* state) {
  npy::Array array;
  array.dtype = dtype;
  array.shape = shape;
  const int64_t count = array.ElementCount();
  const double bound = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(in_features, 1)));
  array.data.resize(static_cast<size_t>(count * npy::ItemSize(dtype)));
  for (int64_t i = 0; i < count; ++i) {
    const double unit = static_cast<double>(SplitMix64(state) >> 11) * 0x1.0p-53;
    const double value = bound * (2 * unit - 1);
    if (dtype == npy::DType::kFloat32) {
      const float f = static_cast<float>(value);
      std::memcpy(array.data.data() + i * sizeof(float), &f, sizeof(float));
    } else {
      std::memcpy(array.data.data() + i * sizeof(double), &value, sizeof(double));
    }
  }
  return array;
}

std::string JoinNames(const std::vector<std::pair<std::string, std::vector<int64_t>>>& specs) {
  std::string out;
  for (const auto& [name, shape] : specs) {
    out += (out.empty() ? "" : ", ") + name + " " + ShapeText(shape);
  }
  return out;
}

std::optional<npy::Array> ArrayOrError(const v1::Tensor& tensor, const std::string& name,
                                       std::ostream& err) {
  std::optional<npy::Array> array = FromTensor(tensor);
  if (!array) {
    err << "gradclient: the server's tensor \"" << name
        << "\" is malformed (unknown dtype, or data not matching its shape)\n";
  }
  return array;
}

}  // namespace

CLI::App* AddComputeCommand(CLI::App& app, ComputeOptions* options) {
  CLI::App* compute = app.add_subcommand(
      "compute",
      "ComputeGradients on a model file (gradserve.v1.Model as JSON or text format, or ONNX) with "
      "the batch in .npy files; prints the loss, each gradient's shape and norm and the "
      "diagnostics, and with --out writes the gradients as .npy files");
  compute->footer(
      "Chain model (layers): --input FILE.npy --loss-target FILE.npy; parameters "
      "<layer index>.weight/.bias (nn.Sequential's state_dict names), initialized as "
      "torch.nn.Linear does (--init-seed) if none are given.\n"
      "Graph model or ONNX: --input NAME=FILE.npy per input, --loss-target FILE.npy sent under "
      "the graph's loss_target; parameters by their names.\n"
      "Example: gradclient compute --model client/examples/models/mlp.json --input x.npy "
      "--loss-target y.npy --out grads/\n"
      "The connection options (--target HOST:PORT, --tls*, ...) may follow the subcommand too.");
  CLI::Option* model =
      compute
          ->add_option("--model", options->model_path,
                       "a gradserve.v1.Model: protobuf JSON (.json) or text format (.txtpb, "
                       ".textproto, .pbtxt, .prototxt; other names: JSON if it starts with '{')")
          ->check(CLI::ExistingFile);
  CLI::Option* onnx =
      compute
          ->add_option("--onnx", options->onnx_path, "an ONNX model, as torch.onnx.export wrote it")
          ->check(CLI::ExistingFile)
          ->type_name("FILE");
  model->excludes(onnx);
  compute
      ->add_option("--input", options->inputs,
                   "chain model: FILE.npy, the batch [batch, features]; graph or ONNX: "
                   "NAME=FILE.npy per graph input (repeat)")
      ->required()
      ->type_name("[NAME=]FILE");
  compute
      ->add_option("--loss-target", options->loss_target_path,
                   "FILE.npy: the loss target (class indices as int64/int32 for cross_entropy; "
                   "graph and ONNX with --loss external: dL/d(loss output))")
      ->type_name("FILE");
  compute
      ->add_option("--output-gradient", options->output_gradient_path,
                   "FILE.npy: chain model with the external loss: dL/d(output), instead of "
                   "--loss-target")
      ->type_name("FILE");
  compute
      ->add_option("--loss", options->loss,
                   "loss applied to the model's output (default: the model file's; mse for ONNX)")
      ->check(
          CLI::IsMember({"mse", "l1", "huber", "cross_entropy", "bce_with_logits", "external"}));
  compute
      ->add_option("--reduction", options->reduction,
                   "how the loss is reduced (default: the model file's; mean for ONNX)")
      ->check(CLI::IsMember({"mean", "sum"}));
  compute
      ->add_option("--dtype", options->dtype,
                   "dtype to compute in; floating .npy files are converted to it (default: a "
                   "graph's declared input dtype, else the files' own, which must then agree)")
      ->check(CLI::IsMember({"float32", "float64"}));
  compute
      ->add_option("--out", options->out_dir,
                   "directory (created if missing) for DIR/<parameter name>.npy per gradient "
                   "('/' in a name written as '_'), DIR/loss.txt, and the files the --return-* "
                   "flags ask for")
      ->type_name("DIR");
  compute
      ->add_option("--param", options->params,
                   "NAME=FILE.npy: parameter NAME's values (ONNX: instead of the file's; "
                   "repeatable)")
      ->type_name("NAME=FILE");
  compute
      ->add_option("--params", options->params_dir,
                   "directory of <parameter name>.npy files, e.g. a previous --out's params/ "
                   "(ONNX: every .npy in it, named by its file name)")
      ->type_name("DIR");
  compute
      ->add_option("--init-seed", options->init_seed,
                   "chain model without --param/--params: seed of the nn.Linear-style "
                   "initialization (written to DIR/params/ with --out)")
      ->capture_default_str();
  compute->add_flag("--return-input-gradient", options->return_input_gradient,
                    "also compute dL/d(input): DIR/input_gradient.npy (chain) or "
                    "DIR/input_gradients/<input name>.npy for each floating --input");
  compute->add_flag("--return-output", options->return_output,
                    "print the outputs' shapes; with --out, write them to "
                    "DIR/outputs/<output name>.npy (a chain's: output.npy)");
  compute
      ->add_option("--checkpoint", options->checkpoint,
                   "gradient checkpointing: none, sqrt, every:K or budget:BYTES (the gradients "
                   "are the same bits either way)")
      ->type_name("MODE");
  compute
      ->add_option("--dropout-seed", options->dropout_seed,
                   "mixed into the Dropout masks: same seed, same masks")
      ->capture_default_str();
  compute
      ->add_option("--frozen", options->frozen,
                   "ONNX: initializer held constant: no gradient computed or returned "
                   "(repeatable)")
      ->type_name("NAME");
  compute->add_flag("--disable-dropout", options->disable_dropout,
                    "ONNX: run the file's Dropout nodes as identity");
  compute
      ->add_option("--loss-output", options->loss_output,
                   "ONNX: graph output the loss reads (default: the file's only output)")
      ->type_name("NAME");
  compute
      ->add_option("--loss-target-name", options->loss_target_name,
                   "ONNX: name the loss target is sent under (default: \"target\"); must not be "
                   "a name the file uses")
      ->type_name("NAME");
  compute
      ->add_option("--batch-input", options->batch_inputs,
                   "ONNX: graph input that also has an initializer (keep_initializers_as_inputs "
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

bool ReadModelFile(const std::string& path, v1::Model* model, std::string* error) {
  std::string text;
  if (!ReadWholeFile(path, "model file", &text, error)) return false;
  const std::string extension = std::filesystem::path(path).extension().string();
  bool json = false;
  if (extension == ".json") {
    json = true;
  } else if (extension == ".txtpb" || extension == ".textproto" || extension == ".pbtxt" ||
             extension == ".prototxt") {
    json = false;
  } else {
    const size_t first = text.find_first_not_of(" \t\r\n");
    json = first != std::string::npos && text[first] == '{';
  }
  model->Clear();
  if (json) {
    const auto status = google::protobuf::util::JsonStringToMessage(text, model);
    if (!status.ok()) {
      // protobuf appends a caret line under the message; the first line says it all.
      std::string message(status.message());
      message = message.substr(0, message.find('\n'));
      *error = path + ": not a gradserve.v1.Model in protobuf JSON: " + message;
      return false;
    }
    return true;
  }
  google::protobuf::TextFormat::Parser parser;
  FirstParseError errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, model)) {
    *error = path + ": not a gradserve.v1.Model in protobuf text format: " + errors.first();
    return false;
  }
  return true;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> ChainParameterShapes(
    const v1::Model& model) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  for (int i = 0; i < model.layers_size(); ++i) {
    if (!model.layers(i).has_linear()) continue;
    const v1::Linear& linear = model.layers(i).linear();
    const std::string prefix = std::to_string(i) + ".";
    shapes.push_back({prefix + "weight", {linear.out_features(), linear.in_features()}});
    if (!linear.has_bias() || linear.bias()) {
      shapes.push_back({prefix + "bias", {linear.out_features()}});
    }
  }
  return shapes;
}

bool BuildRequest(const ComputeOptions& options, v1::ComputeGradientsRequest* request,
                  std::string* error, BuildInfo* info) {
  if (options.model_path.empty() == options.onnx_path.empty()) {
    *error = "give the model as --model FILE (JSON or text format) or --onnx FILE, one of them";
    return false;
  }
  v1::Model model;
  const std::string& model_path =
      options.onnx_path.empty() ? options.model_path : options.onnx_path;
  if (!options.onnx_path.empty()) {
    std::string onnx;
    if (!ReadWholeFile(options.onnx_path, "ONNX file", &onnx, error)) return false;
    if (onnx.empty()) {
      *error = options.onnx_path + ": the ONNX file is empty";
      return false;
    }
    model.mutable_onnx()->set_model(std::move(onnx));
    model.mutable_loss()->set_reduction(v1::REDUCTION_MEAN);
    if (!SetLossKind(options.loss.empty() ? "mse" : options.loss, model.mutable_loss(), error)) {
      return false;
    }
  } else {
    if (!ReadModelFile(options.model_path, &model, error)) return false;
    if (model.has_onnx()) {
      *error = model_path + ": holds an ONNX model: pass the .onnx file itself as --onnx FILE";
      return false;
    }
    if (!model.has_graph() && model.layers_size() == 0) {
      *error = model_path + ": the model has neither layers nor a graph";
      return false;
    }
    if (!options.loss.empty() && !SetLossKind(options.loss, model.mutable_loss(), error)) {
      return false;
    }
    if (model.loss().kind_case() == v1::Loss::KIND_NOT_SET) {
      *error =
          model_path + ": the model has no loss: add one (e.g. loss { mse {} }) or pass --loss";
      return false;
    }
    for (const auto& [flag, given] :
         {std::pair{"--frozen", !options.frozen.empty()},
          std::pair{"--batch-input", !options.batch_inputs.empty()},
          std::pair{"--disable-dropout", options.disable_dropout},
          std::pair{"--loss-output", !options.loss_output.empty()},
          std::pair{"--loss-target-name", !options.loss_target_name.empty()}}) {
      if (given) {
        *error = std::string(flag) + " applies to --onnx models only";
        return false;
      }
    }
  }
  if (!options.reduction.empty()) {
    model.mutable_loss()->set_reduction(options.reduction == "sum" ? v1::REDUCTION_SUM
                                                                   : v1::REDUCTION_MEAN);
  }
  const ModelKind kind = KindOf(model);
  const bool external = model.loss().has_external();

  // The batch.
  std::vector<NamedFile> inputs, params;
  std::string target_name;
  if (kind == ModelKind::kChain) {
    if (options.inputs.size() != 1) {
      *error = "--input: a chain model takes one input file, given " +
               std::to_string(options.inputs.size());
      return false;
    }
    const std::string& path = options.inputs[0];
    if (path.find('=') != std::string::npos && !std::filesystem::exists(path)) {
      *error = "--input " + path + ": a chain model's input is a plain FILE.npy, not NAME=FILE";
      return false;
    }
    inputs.push_back({"--input", "inputs", path, {}});
    if (external) {
      if (options.output_gradient_path.empty() || !options.loss_target_path.empty()) {
        *error =
            "the external loss takes --output-gradient FILE.npy (dL/d(output)) and no "
            "--loss-target";
        return false;
      }
      inputs.push_back({"--output-gradient", "output_gradient", options.output_gradient_path, {}});
    } else {
      if (options.loss_target_path.empty() || !options.output_gradient_path.empty()) {
        *error =
            "the model's loss takes --loss-target FILE.npy (--output-gradient is for the "
            "external loss)";
        return false;
      }
      inputs.push_back({"--loss-target", "targets", options.loss_target_path, {}});
    }
  } else {
    if (!options.output_gradient_path.empty()) {
      *error =
          "--output-gradient is for chain models; a graph's external loss reads "
          "dL/d(loss output) from --loss-target";
      return false;
    }
    for (const std::string& text : options.inputs) {
      if (!SplitNamedFile("--input", text, &inputs.emplace_back(), error)) return false;
    }
    if (kind == ModelKind::kOnnx) {
      target_name = options.loss_target_name.empty() ? "target" : options.loss_target_name;
    } else {
      target_name = model.graph().loss_target();
    }
    const bool target_as_input =
        std::any_of(inputs.begin(), inputs.end(),
                    [&](const NamedFile& file) { return file.name == target_name; });
    if (!options.loss_target_path.empty()) {
      if (target_name.empty()) {
        *error =
            "--loss-target: the graph names no loss_target; pass the target as one of "
            "its inputs (--input NAME=FILE.npy)";
        return false;
      }
      inputs.push_back({"--loss-target", target_name, options.loss_target_path, {}});
    } else if (!target_as_input) {
      *error = "--loss-target FILE.npy is missing (sent as \"" + target_name + "\")";
      return false;
    }
  }

  // The parameters: which the model takes (unknown for ONNX until the server reads the file),
  // and where each comes from.
  std::optional<std::vector<std::pair<std::string, std::vector<int64_t>>>> expected;
  if (kind == ModelKind::kChain) expected = ChainParameterShapes(model);
  if (kind == ModelKind::kGraph) {
    expected.emplace();
    for (const v1::GraphParameter& p : model.graph().parameters()) {
      expected->push_back({p.name(), {p.shape().begin(), p.shape().end()}});
    }
  }
  for (const std::string& text : options.params) {
    if (!SplitNamedFile("--param", text, &params.emplace_back(), error)) return false;
  }
  auto given = [&](const std::string& name) {
    return std::any_of(params.begin(), params.end(),
                       [&](const NamedFile& file) { return file.name == name; });
  };
  if (expected) {
    for (const NamedFile& file : params) {
      if (std::none_of(expected->begin(), expected->end(),
                       [&](const auto& spec) { return spec.first == file.name; })) {
        *error = "--param " + file.name + "=" + file.path + ": the model has no parameter \"" +
                 file.name + "\" (it has: " + JoinNames(*expected) + ")";
        return false;
      }
    }
  }
  if (!options.params_dir.empty()) {
    const std::filesystem::path dir(options.params_dir);
    if (!std::filesystem::is_directory(dir)) {
      *error = "--params " + options.params_dir + ": not a directory";
      return false;
    }
    if (expected) {
      for (const auto& [name, shape] : *expected) {
        const std::filesystem::path path = dir / NpyFileName(name);
        if (!given(name) && std::filesystem::exists(path)) {
          params.push_back({"--params", name, path.string(), {}});
        }
      }
    } else {
      std::vector<std::filesystem::path> files;
      for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        if (entry.path().extension() == ".npy") files.push_back(entry.path());
      }
      std::sort(files.begin(), files.end());
      for (const std::filesystem::path& path : files) {
        if (!given(path.stem().string())) {
          params.push_back({"--params", path.stem().string(), path.string(), {}});
        }
      }
    }
  }
  bool initialize = false;
  if (expected) {
    std::vector<std::pair<std::string, std::vector<int64_t>>> missing;
    for (const auto& spec : *expected) {
      if (!given(spec.first)) missing.push_back(spec);
    }
    initialize = !missing.empty() && kind == ModelKind::kChain && options.params.empty() &&
                 options.params_dir.empty();
    if (!missing.empty() && !initialize) {
      *error = "parameters missing: " + JoinNames(missing) +
               " (give them as --param NAME=FILE.npy, or --params DIR holding NAME.npy" +
               (options.params_dir.empty() ? "" : "; not found in " + options.params_dir) + ")";
      return false;
    }
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

  // One floating dtype for the whole request, as the service requires: --dtype, else what a
  // graph declares for its inputs (numpy saves float64 by default, a graph may well be float32),
  // else the files' own.
  std::optional<npy::DType> dtype;
  if (!options.dtype.empty()) {
    dtype = options.dtype == "float64" ? npy::DType::kFloat64 : npy::DType::kFloat32;
  } else if (kind == ModelKind::kGraph) {
    for (const v1::GraphInput& input : model.graph().inputs()) {
      if (input.dtype() == v1::DTYPE_FLOAT32 || input.dtype() == v1::DTYPE_FLOAT64) {
        dtype = *NpyDType(input.dtype());
        break;
      }
    }
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
      if (!dtype && IsFloating(file.array.dtype)) {
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
  if (!dtype && first_floating != nullptr) dtype = first_floating->array.dtype;
  if (!dtype && kind != ModelKind::kOnnx) dtype = npy::DType::kFloat32;
  for (std::vector<NamedFile>* files : {&inputs, &params}) {
    for (NamedFile& file : *files) {
      if (dtype) ConvertFloating(*dtype, &file.array);
    }
  }
  if (expected) {
    for (const NamedFile& file : params) {
      const auto spec = std::find_if(expected->begin(), expected->end(),
                                     [&](const auto& s) { return s.first == file.name; });
      if (spec->second != file.array.shape) {
        *error = file.path + ": shape " + ShapeText(file.array.shape) + ", but the model's " +
                 file.name + " is " + ShapeText(spec->second);
        return false;
      }
    }
  }

  std::map<std::string, v1::Tensor> by_name;
  for (NamedFile& file : params) by_name[file.name] = ToTensor(file.array);
  if (initialize) {
    uint64_t state = options.init_seed;
    for (const auto& [name, shape] : *expected) {
      const int64_t in_features =
          model.layers(std::stoi(name.substr(0, name.find('.')))).linear().in_features();
      by_name[name] = ToTensor(InitLinearParameter(shape, in_features, *dtype, &state));
      if (info != nullptr) info->initialized.emplace_back(name, by_name[name]);
    }
  }

  v1::ComputeOptions* compute_options = request->mutable_options();
  compute_options->set_return_output(options.return_output);
  compute_options->set_dropout_seed(options.dropout_seed);
  if (!options.checkpoint.empty() &&
      !SetCheckpointing(options.checkpoint, compute_options->mutable_checkpointing(), error)) {
    return false;
  }
  switch (kind) {
    case ModelKind::kChain:
      for (const auto& [name, shape] : *expected) {
        const bool weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
        if (weight) request->add_parameters();
        v1::LinearParameters* layer = request->mutable_parameters(request->parameters_size() - 1);
        *(weight ? layer->mutable_weight() : layer->mutable_bias()) = std::move(by_name[name]);
      }
      *request->mutable_inputs() = ToTensor(inputs[0].array);
      *(external ? request->mutable_output_gradient() : request->mutable_targets()) =
          ToTensor(inputs[1].array);
      compute_options->set_return_input_gradient(options.return_input_gradient);
      break;
    case ModelKind::kGraph:
      for (const auto& [name, shape] : *expected) {
        v1::NamedTensor* tensor = request->add_named_parameters();
        tensor->set_name(name);
        *tensor->mutable_tensor() = std::move(by_name[name]);
      }
      break;
    case ModelKind::kOnnx: {
      v1::OnnxModel* onnx_model = model.mutable_onnx();
      if (dtype) onnx_model->set_dtype(WireDType(*dtype));
      onnx_model->set_loss_output(options.loss_output);
      onnx_model->set_loss_target(options.loss_target_name);
      for (const std::string& name : options.frozen) onnx_model->add_frozen(name);
      for (const std::string& name : options.batch_inputs) onnx_model->add_batch_inputs(name);
      onnx_model->set_disable_dropout(options.disable_dropout);
      for (NamedFile& file : params) {
        v1::NamedTensor* tensor = request->add_named_parameters();
        tensor->set_name(file.name);
        *tensor->mutable_tensor() = std::move(by_name[file.name]);
      }
      break;
    }
  }
  if (kind != ModelKind::kChain) {
    for (const NamedFile& file : inputs) {
      v1::NamedTensor* tensor = request->add_graph_inputs();
      tensor->set_name(file.name);
      *tensor->mutable_tensor() = ToTensor(file.array);
      if (options.return_input_gradient && file.name != target_name &&
          IsFloating(file.array.dtype)) {
        compute_options->add_input_gradient_names(file.name);
      }
    }
  }
  *request->mutable_model() = std::move(model);
  return true;
}

int RunCompute(GradientClient& client, const ComputeOptions& options, std::ostream& out,
               std::ostream& err) {
  std::string error;
  v1::ComputeGradientsRequest request;
  BuildInfo info;
  if (!BuildRequest(options, &request, &error, &info)) {
    err << "gradclient: " << error << "\n";
    return 2;
  }
  v1::ComputeGradientsResponse response;
  if (const grpc::Status status = client.ComputeGradients(request, &response); !status.ok()) {
    err << "gradclient: ComputeGradients failed: " << FormatStatus(status) << "\n";
    return 1;
  }

  const ModelKind kind = KindOf(request.model());
  std::vector<std::pair<std::string, npy::Array>> gradients, input_gradients, outputs;
  auto add = [&](const std::string& name, const v1::Tensor& tensor,
                 std::vector<std::pair<std::string, npy::Array>>* to) {
    std::optional<npy::Array> array = ArrayOrError(tensor, name, err);
    if (array) to->emplace_back(name, std::move(*array));
    return array.has_value();
  };
  if (kind == ModelKind::kChain) {
    // The answer's LinearGradients follow the request's LinearParameters, which follow
    // ChainParameterShapes.
    int layer = -1;
    for (const auto& [name, shape] : ChainParameterShapes(request.model())) {
      const bool weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
      if (weight) ++layer;
      if (layer >= response.gradients_size()) {
        err << "gradclient: the server answered " << response.gradients_size()
            << " LinearGradients for a model with more Linear layers\n";
        return 1;
      }
      const v1::LinearGradients& g = response.gradients(layer);
      if (!add(name, weight ? g.weight() : g.bias(), &gradients)) return 1;
    }
    if (response.has_input_gradient() &&
        !add("input_gradient", response.input_gradient(), &input_gradients)) {
      return 1;
    }
    if (response.has_output() && !add("output", response.output(), &outputs)) return 1;
  } else {
    for (const auto& [from, to] : {std::pair{&response.named_gradients(), &gradients},
                                   std::pair{&response.input_gradients(), &input_gradients},
                                   std::pair{&response.outputs(), &outputs}}) {
      for (const v1::NamedTensor& named : *from) {
        if (!add(named.name(), named.tensor(), to)) return 1;
      }
    }
  }

  char line[256];
  if (!info.initialized.empty()) {
    out << "initialized " << info.initialized.size()
        << " parameters as torch.nn.Linear does (--init-seed " << options.init_seed << ")\n";
  }
  std::snprintf(line, sizeof(line), "%.9g", response.loss());
  out << "loss " << line << " ("
      << (gradients.empty() ? "no gradients" : npy::DTypeName(gradients[0].second.dtype)) << ", "
      << gradients.size() << " gradients)\n";
  size_t name_width = 0, shape_width = 0;
  for (const auto* list : {&gradients, &input_gradients}) {
    for (const auto& [name, array] : *list) {
      name_width = std::max(name_width, name.size());
      shape_width = std::max(shape_width, ShapeText(array.shape).size());
    }
  }
  for (const auto* list : {&gradients, &input_gradients}) {
    for (const auto& [name, array] : *list) {
      const std::string shape = ShapeText(array.shape);
      std::snprintf(line, sizeof(line), "norm %.6g", Norm(array));
      out << (list == &gradients ? "  " : "  d/d ") << name
          << std::string(name_width - name.size(), ' ') << "  " << shape
          << std::string(shape_width - shape.size(), ' ') << "  " << line << "\n";
    }
  }
  for (const auto& [name, array] : outputs) {
    out << "output " << name << "  " << ShapeText(array.shape) << "\n";
  }
  if (response.diagnostics_size() > 0) out << "per-layer diagnostics:\n";
  for (const v1::LayerDiagnostics& d : response.diagnostics()) {
    std::snprintf(line, sizeof(line),
                  "  [%d] %-10s |dW|=%s |db|=%s |dL/dout|=%s |out|=%.4g non-finite=%lld\n",
                  d.layer_index(), d.kind().c_str(),
                  FormatNorm(d.has_weight_grad_norm(), d.weight_grad_norm()).c_str(),
                  FormatNorm(d.has_bias_grad_norm(), d.bias_grad_norm()).c_str(),
                  FormatNorm(d.has_output_grad_norm(), d.output_grad_norm()).c_str(),
                  d.activation_norm(), static_cast<long long>(d.non_finite_count()));
    out << line;
  }
  if (response.value_diagnostics_size() > 0) out << "per-value diagnostics:\n";
  for (const v1::ValueDiagnostics& d : response.value_diagnostics()) {
    std::snprintf(line, sizeof(line), "|dL/dv|=%s |v|=%.4g non-finite=%lld",
                  FormatNorm(d.has_grad_norm(), d.grad_norm()).c_str(), d.value_norm(),
                  static_cast<long long>(d.non_finite_count()));
    out << "  " << d.value() << " (" << d.op_type() << ")  " << line << "\n";
  }

  if (options.out_dir.empty()) return 0;
  const std::filesystem::path dir(options.out_dir);
  std::vector<std::pair<std::string, npy::Array>> initialized;
  for (const auto& [name, tensor] : info.initialized) {
    initialized.emplace_back(name, *FromTensor(tensor));
  }
  const bool chain_dx = kind == ModelKind::kChain;
  if (!WriteArrays(dir, gradients, &error) ||
      (!input_gradients.empty() &&
       !WriteArrays(chain_dx ? dir : dir / "input_gradients", input_gradients, &error)) ||
      (!outputs.empty() && !WriteArrays(dir / "outputs", outputs, &error)) ||
      (!initialized.empty() && !WriteArrays(dir / "params", initialized, &error))) {
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
      << (input_gradients.empty() ? ""
          : chain_dx              ? "input_gradient.npy, "
                                  : "input_gradients/, ")
      << (outputs.empty() ? "" : std::to_string(outputs.size()) + " outputs (outputs/), ")
      << (initialized.empty() ? "" : "the initial parameters (params/), ") << "loss.txt to "
      << dir.string() << "\n";
  return 0;
}

}  // namespace gradserve::client::compute
