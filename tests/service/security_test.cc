// Transport security and authentication over real TCP on 127.0.0.1: TLS and mutual TLS with
// certificates this test makes with the openssl CLI (a CA, a server certificate for 127.0.0.1
// and localhost, a client certificate, and a second CA nobody trusts), and the bearer token on
// every GradientService method with health left open.
#include <gmock/gmock.h>
#include <google/protobuf/descriptor.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <memory>
#include <string>

#include "gradserve/client.h"
#include "server/service/auth.h"
#include "server/service/server.h"
#include "tests/service/headers_only_call.h"
#include "tests/service/test_requests.h"

namespace gradserve {
namespace {

using ::testing::HasSubstr;
namespace v1 = ::gradserve::v1;
namespace fs = std::filesystem;

void WriteFile(const fs::path& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

// The extensions of each certificate. The server's names 127.0.0.1 and localhost as subject
// alternative names: gRPC checks the SAN, not the CN.
constexpr char kOpensslConfig[] = R"(
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
)";

// A throwaway PKI in a temporary directory, made once per test process: P-256 keys, so the
// whole set takes a few tens of milliseconds. `error` is empty on success.
struct Pki {
  fs::path dir;
  std::string error;

  fs::path File(const std::string& name) const { return dir / name; }

  static const Pki& Get() {
    static const Pki* pki = new Pki(Make());
    return *pki;
  }

 private:
  int serial_ = 1;

  bool Run(const std::string& args) {
    const std::string log = (dir / "openssl.log").string();
    const std::string command =
        "cd '" + dir.string() + "' && openssl " + args + " >'" + log + "' 2>&1";
    if (std::system(command.c_str()) == 0) return true;
    std::ifstream in(log);
    error = "openssl " + args + " failed:\n" +
            std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return false;
  }

  // A self-signed CA `name`.pem / `name`.key.
  bool MakeCa(const std::string& name) {
    return Run(
        "req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2"
        " -config openssl.cnf -extensions ca -subj '/CN=gradserve test " +
        name + "' -keyout " + name + ".key -out " + name + ".pem");
  }

  // `name`.pem / `name`.key, signed by `ca`, with the extensions of `section`.
  bool MakeLeaf(const std::string& name, const std::string& ca, const std::string& section) {
    return Run("req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -config openssl.cnf"
               " -subj '/CN=" +
               name + "' -keyout " + name + ".key -out " + name + ".csr") &&
           Run("x509 -req -in " + name + ".csr -CA " + ca + ".pem -CAkey " + ca +
               ".key -set_serial " + std::to_string(++serial_) +
               " -days 2 -extfile openssl.cnf -extensions " + section + " -out " + name + ".pem");
  }

  static Pki Make() {
    Pki pki;
    if (std::system("openssl version >/dev/null 2>&1") != 0) {
      pki.error = "the openssl command is missing (deploy/install-deps.sh installs it)";
      return pki;
    }
    std::string pattern = (fs::temp_directory_path() / "gradserve-security-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
      pki.error = "mkdtemp failed";
      return pki;
    }
    pki.dir = pattern;
    WriteFile(pki.dir / "openssl.cnf", kOpensslConfig);
    WriteFile(pki.dir / "not-pem.txt", "just text\n");
    const bool ok = pki.MakeCa("ca") && pki.MakeCa("other-ca") &&
                    pki.MakeLeaf("server", "ca", "server") &&
                    pki.MakeLeaf("client", "ca", "client") &&
                    pki.MakeLeaf("other-client", "other-ca", "client");
    if (!ok && pki.error.empty()) pki.error = "certificate generation failed";
    std::atexit([] {
      std::error_code ignored;
      fs::remove_all(Get().dir, ignored);
    });
    return pki;
  }
};

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { spdlog::set_level(spdlog::level::err); }

  void SetUp() override {
    // Fail, never skip: without openssl these tests would prove nothing.
    ASSERT_EQ(Pki::Get().error, "");
  }

  static std::string Path(const std::string& name) { return Pki::Get().File(name).string(); }

  // A server on 127.0.0.1, a free port, with `security`.
  static std::unique_ptr<service::GradServer> Serve(const service::SecurityOptions& security) {
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.security = security;
    options.service.threads = 1;
    auto server = service::GradServer::Start(options);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? *std::move(server) : nullptr;
  }

  static service::SecurityOptions Tls() {
    service::SecurityOptions security;
    security.tls_cert_file = Path("server.pem");
    security.tls_key_file = Path("server.key");
    return security;
  }

  static service::SecurityOptions MutualTls() {
    service::SecurityOptions security = Tls();
    security.tls_client_ca_file = Path("ca.pem");
    return security;
  }

  // A client of `server` over TCP. root_ca: the CA file it trusts ("" = plaintext); client:
  // the basename of its certificate and key for mutual TLS ("" = none).
  static client::ClientOptions Options(const std::string& root_ca, const std::string& client = "",
                                       const std::string& token = "") {
    client::ClientOptions options;
    options.timeout = std::chrono::seconds(5);
    options.tls.enabled = !root_ca.empty();
    if (!root_ca.empty()) options.tls.root_ca_file = Path(root_ca);
    if (!client.empty()) {
      options.tls.cert_file = Path(client + ".pem");
      options.tls.key_file = Path(client + ".key");
    }
    options.bearer_token = token;
    return options;
  }

  static client::GradientClient Connect(const service::GradServer& server,
                                        const client::ClientOptions& options) {
    return client::GradientClient(
        client::CreateChannel("127.0.0.1:" + std::to_string(server.port()), options), options);
  }

  static grpc::Status Info(const service::GradServer& server,
                           const client::ClientOptions& options) {
    v1::GetServerInfoResponse info;
    return Connect(server, options).GetServerInfo(&info);
  }

  static grpc::Status Compute(const service::GradServer& server,
                              const client::ClientOptions& options) {
    v1::ComputeGradientsResponse response;
    return Connect(server, options).ComputeGradients(testing::SeedRequest<double>(), &response);
  }
};

constexpr auto kOk = grpc::StatusCode::OK;
constexpr auto kUnavailable = grpc::StatusCode::UNAVAILABLE;
constexpr auto kUnauthenticated = grpc::StatusCode::UNAUTHENTICATED;

TEST_F(SecurityTest, TlsCallSucceedsWithTheRightCa) {
  auto server = Serve(Tls());
  ASSERT_NE(server, nullptr);
  const grpc::Status status = Compute(*server, Options("ca.pem"));
  EXPECT_EQ(status.error_code(), kOk) << status.error_message();
}

TEST_F(SecurityTest, TlsClientTrustingAnotherCaIsRefused) {
  auto server = Serve(Tls());
  ASSERT_NE(server, nullptr);
  const grpc::Status status = Info(*server, Options("other-ca.pem"));
  EXPECT_EQ(status.error_code(), kUnavailable) << status.error_message();
}

TEST_F(SecurityTest, PlaintextClientOfTlsServerIsRefused) {
  auto server = Serve(Tls());
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(Info(*server, Options("")).error_code(), kUnavailable);
}

// The certificate names 127.0.0.1 and localhost: an override to localhost passes, one to a name
// the certificate does not carry fails, which shows the override is what gets verified.
TEST_F(SecurityTest, ServerNameOverrideIsVerified) {
  auto server = Serve(Tls());
  ASSERT_NE(server, nullptr);
  client::ClientOptions options = Options("ca.pem");
  options.tls.server_name_override = "localhost";
  EXPECT_EQ(Info(*server, options).error_code(), kOk);
  options.tls.server_name_override = "elsewhere.example";
  EXPECT_EQ(Info(*server, options).error_code(), kUnavailable);
}

TEST_F(SecurityTest, MutualTlsRefusesClientWithoutCertificate) {
  auto server = Serve(MutualTls());
  ASSERT_NE(server, nullptr);
  const grpc::Status status = Info(*server, Options("ca.pem"));
  EXPECT_EQ(status.error_code(), kUnavailable) << status.error_message();
}

TEST_F(SecurityTest, MutualTlsRefusesCertificateFromAnotherCa) {
  auto server = Serve(MutualTls());
  ASSERT_NE(server, nullptr);
  const grpc::Status status = Info(*server, Options("ca.pem", "other-client"));
  EXPECT_EQ(status.error_code(), kUnavailable) << status.error_message();
}

TEST_F(SecurityTest, MutualTlsAcceptsCertificateFromTheClientCa) {
  auto server = Serve(MutualTls());
  ASSERT_NE(server, nullptr);
  const grpc::Status status = Compute(*server, Options("ca.pem", "client"));
  EXPECT_EQ(status.error_code(), kOk) << status.error_message();
}

TEST_F(SecurityTest, TokenIsRequiredOnEveryCall) {
  service::SecurityOptions security;
  security.auth_token = "s3cret-token";
  auto server = Serve(security);
  ASSERT_NE(server, nullptr);
  for (const char* token : {"", "wrong-token", "s3cret-toke", "s3cret-token-"}) {
    SCOPED_TRACE(std::string("token '") + token + "'");
    const grpc::Status compute = Compute(*server, Options("", "", token));
    EXPECT_EQ(compute.error_code(), kUnauthenticated);
    EXPECT_EQ(compute.error_message(), "missing or invalid bearer token");
    EXPECT_EQ(Info(*server, Options("", "", token)).error_code(), kUnauthenticated);
    v1::CheckGradientsRequest check;
    *check.mutable_request() = testing::SeedRequest<double>();
    v1::CheckGradientsResponse response;
    EXPECT_EQ(
        Connect(*server, Options("", "", token)).CheckGradients(check, &response).error_code(),
        kUnauthenticated);
  }
  EXPECT_EQ(Compute(*server, Options("", "", "s3cret-token")).error_code(), kOk);
  EXPECT_EQ(Info(*server, Options("", "", "s3cret-token")).error_code(), kOk);
}

TEST_F(SecurityTest, HealthNeedsNoToken) {
  service::SecurityOptions security = MutualTls();
  security.auth_token = "s3cret-token";
  auto server = Serve(security);
  ASSERT_NE(server, nullptr);
  bool serving = false;
  const grpc::Status status = Connect(*server, Options("ca.pem", "client")).Health("", &serving);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(serving);
  // Token and mutual TLS together.
  EXPECT_EQ(Info(*server, Options("ca.pem", "client")).error_code(), kUnauthenticated);
  EXPECT_EQ(Compute(*server, Options("ca.pem", "client", "s3cret-token")).error_code(), kOk);
}

// Every method of the service, found from the descriptor so that a method added later is
// covered too: refused without the token, and with it reaches the service (a method the
// authenticating wrapper does not forward would answer UNIMPLEMENTED).
TEST_F(SecurityTest, EveryMethodRefusesCallsWithoutToken) {
  service::SecurityOptions security;
  security.auth_token = "s3cret-token";
  auto server = Serve(security);
  ASSERT_NE(server, nullptr);
  const google::protobuf::ServiceDescriptor* descriptor =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
          v1::GradientService::service_full_name());
  ASSERT_NE(descriptor, nullptr);
  ASSERT_GE(descriptor->method_count(), 3);
  grpc::GenericStub stub(server->InProcessChannel());
  for (int i = 0; i < descriptor->method_count(); ++i) {
    const std::string method = "/" + descriptor->full_name() + "/" + descriptor->method(i)->name();
    for (const std::string token : {"", "s3cret-token"}) {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
      grpc::Slice empty("");
      const grpc::ByteBuffer request(&empty, 1);
      grpc::ByteBuffer response;
      std::promise<grpc::Status> done;
      stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                     [&done](grpc::Status status) { done.set_value(std::move(status)); });
      const grpc::StatusCode code = done.get_future().get().error_code();
      if (token.empty()) {
        EXPECT_EQ(code, kUnauthenticated) << method;
      } else {
        EXPECT_NE(code, kUnauthenticated) << method;
        EXPECT_NE(code, grpc::StatusCode::UNIMPLEMENTED) << method << " is not forwarded";
      }
    }
  }
}

// Note [Admission at the headers]: a call without the token is refused on its headers alone, so
// a client cannot make the server receive and parse a large message it will refuse anyway (old
// code: the call waited for its message, here until the deadline).
TEST_F(SecurityTest, CallWithoutTokenIsRefusedBeforeItsMessageArrives) {
  service::SecurityOptions security;
  security.auth_token = "s3cret-token";
  auto server = Serve(security);
  ASSERT_NE(server, nullptr);
  for (const char* method : {"/gradserve.v1.GradientService/ComputeGradients",
                             "/gradserve.v1.GradientService/CheckGradients"}) {
    testing::HeadersOnlyCall call(server->InProcessChannel(), method);
    ASSERT_TRUE(call.EndsWithin(std::chrono::seconds(10))) << method << " waited for its message";
    EXPECT_EQ(call.status().error_code(), kUnauthenticated) << method;
    // With the token, the same call is let through and waits for its message.
    testing::HeadersOnlyCall with_token(server->InProcessChannel(), method, "s3cret-token");
    EXPECT_FALSE(with_token.EndsWithin(std::chrono::milliseconds(300))) << method;
  }
}

TEST(BearerToken, ComparisonAndHeaderParsing) {
  EXPECT_TRUE(service::ConstantTimeEquals("", ""));
  EXPECT_TRUE(service::ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(service::ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(service::ConstantTimeEquals("abc", "ab"));
  EXPECT_FALSE(service::ConstantTimeEquals("", "a"));

  auto check = [](const char* header) {
    std::multimap<grpc::string_ref, grpc::string_ref> metadata;
    if (header != nullptr) metadata.emplace("authorization", header);
    return service::CheckBearerToken(metadata, "tok").error_code();
  };
  EXPECT_EQ(check("Bearer tok"), kOk);
  EXPECT_EQ(check("bearer tok"), kOk);  // The scheme is case-insensitive.
  EXPECT_EQ(check("BEARER  tok"), kOk);
  EXPECT_EQ(check(nullptr), kUnauthenticated);
  EXPECT_EQ(check("tok"), kUnauthenticated);
  EXPECT_EQ(check("Basic tok"), kUnauthenticated);
  EXPECT_EQ(check("Bearertok"), kUnauthenticated);
  EXPECT_EQ(check("Bearer "), kUnauthenticated);
  EXPECT_EQ(check("Bearer to"), kUnauthenticated);
  EXPECT_EQ(check("Bearer tokk"), kUnauthenticated);
}

TEST_F(SecurityTest, TokenFileRules) {
  const fs::path file = Pki::Get().File("token");
  WriteFile(file, "abc123\n");
  EXPECT_EQ(service::ReadAuthTokenFile(file.string()).value_or(""), "abc123");
  WriteFile(file, "abc123\r\n");
  EXPECT_EQ(service::ReadAuthTokenFile(file.string()).value_or(""), "abc123");
  WriteFile(file, "\n");
  EXPECT_THAT(service::ReadAuthTokenFile(file.string()).status().message(), HasSubstr("is empty"));
  WriteFile(file, "two words\n");
  EXPECT_THAT(service::ReadAuthTokenFile(file.string()).status().message(),
              HasSubstr("visible ASCII"));
  EXPECT_THAT(service::ReadAuthTokenFile(Path("missing")).status().message(),
              HasSubstr("cannot read"));
}

// A client whose CA file is missing gets no channel credentials; a channel made anyway fails
// every call instead of falling back to plaintext.
TEST_F(SecurityTest, ClientWithUnreadableCaFailsClosed) {
  service::SecurityOptions security;  // A plaintext server: a fallback would succeed.
  auto server = Serve(security);
  ASSERT_NE(server, nullptr);
  client::ClientOptions options = Options("missing-ca.pem");
  std::string error;
  EXPECT_EQ(client::MakeChannelCredentials(options, &error), nullptr);
  EXPECT_THAT(error, HasSubstr("missing-ca.pem"));
  EXPECT_EQ(Info(*server, options).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  options.tls = {};
  EXPECT_EQ(Info(*server, options).error_code(), kOk);
}

TEST_F(SecurityTest, InconsistentOrUnreadableTlsFilesAreRefusedAtStart) {
  auto start = [](const service::SecurityOptions& security) {
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.security = security;
    return service::GradServer::Start(options).status();
  };
  service::SecurityOptions cert_only = Tls();
  cert_only.tls_key_file.clear();
  EXPECT_TRUE(absl::IsInvalidArgument(start(cert_only)));
  service::SecurityOptions ca_only;
  ca_only.tls_client_ca_file = Path("ca.pem");
  EXPECT_TRUE(absl::IsInvalidArgument(start(ca_only)));
  service::SecurityOptions missing = Tls();
  missing.tls_key_file = Path("missing.key");
  const absl::Status status = start(missing);
  EXPECT_TRUE(absl::IsInvalidArgument(status));
  EXPECT_THAT(status.message(), HasSubstr("missing.key"));
  service::SecurityOptions not_pem = MutualTls();
  not_pem.tls_client_ca_file = Path("not-pem.txt");
  EXPECT_THAT(start(not_pem).message(), HasSubstr("holds no PEM block"));
}

}  // namespace
}  // namespace gradserve
