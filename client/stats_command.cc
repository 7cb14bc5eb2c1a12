#include "client/stats_command.h"

#include <google/protobuf/util/json_util.h>

#include <cstdio>
#include <iostream>
#include <string>

namespace gradserve::client {

void PrintStats(const v1::GetStatsResponse& stats, std::ostream& out) {
  char line[160];
  std::snprintf(line, sizeof(line), "uptime %.1f s, calls in flight %d, queue length %d\n",
                stats.uptime_seconds(), stats.calls_in_flight(), stats.queue_length());
  out << line;
  for (const v1::MethodStats& method : stats.methods()) {
    out << "\n" << method.method() << ": " << method.calls() << " calls";
    for (const v1::StatusCount& code : method.by_code()) {
      out << (&code == &method.by_code(0) ? " (" : ", ") << code.code() << " " << code.calls();
    }
    out << (method.by_code_size() > 0 ? ")\n" : "\n");
    if (method.total().count() == 0) continue;
    out << "  phase      count    mean_ms     p50_ms     p90_ms     p99_ms     max_ms\n";
    const std::pair<const char*, const v1::LatencySummary*> phases[] = {
        {"total", &method.total()},
        {"queue", &method.queue()},
        {"decode", &method.decode()},
        {"compute", &method.compute()},
        {"encode", &method.encode()}};
    for (const auto& [name, phase] : phases) {
      if (phase->count() == 0) continue;
      std::snprintf(line, sizeof(line), "  %-8s %7llu %10.3f %10.3f %10.3f %10.3f %10.3f\n", name,
                    static_cast<unsigned long long>(phase->count()),
                    1e3 * phase->sum_seconds() / static_cast<double>(phase->count()),
                    1e3 * phase->p50_seconds(), 1e3 * phase->p90_seconds(),
                    1e3 * phase->p99_seconds(), 1e3 * phase->max_seconds());
      out << line;
    }
  }
}

void PrintJson(const google::protobuf::Message& message, std::ostream& out) {
  google::protobuf::util::JsonPrintOptions json_options;
  json_options.preserve_proto_field_names = true;
  json_options.always_print_primitive_fields = true;
  std::string json;
  // Printing a message the stub parsed cannot fail (no Any fields to resolve); should it ever,
  // an empty object keeps stdout valid JSON.
  if (!google::protobuf::util::MessageToJsonString(message, &json, json_options).ok()) json = "{}";
  out << json << "\n";
}

int RunStatsCommand(const std::shared_ptr<grpc::Channel>& channel, const ClientOptions& options,
                    bool json) {
  std::unique_ptr<v1::GradientService::Stub> stub = v1::GradientService::NewStub(channel);
  grpc::ClientContext context;
  PrepareContext(options, &context);
  v1::GetStatsResponse stats;
  const grpc::Status status = stub->GetStats(&context, v1::GetStatsRequest(), &stats);
  if (!status.ok()) {
    std::cerr << "gradclient: GetStats failed: " << FormatStatus(status) << "\n";
    return 1;
  }
  if (json) {
    PrintJson(stats, std::cout);
  } else {
    PrintStats(stats, std::cout);
  }
  return 0;
}

}  // namespace gradserve::client
