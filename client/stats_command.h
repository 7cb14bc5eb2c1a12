// `gradclient stats`: the server's GetStats as a table or, for scripts, as JSON.
#ifndef GRADSERVE_CLIENT_STATS_COMMAND_H_
#define GRADSERVE_CLIENT_STATS_COMMAND_H_

#include <grpcpp/grpcpp.h>

#include <iosfwd>
#include <memory>

#include "gradserve/client.h"

namespace gradserve::client {

// Prints `stats`: the load, then per method the calls by status code and, per phase with
// samples, count, mean and p50/p90/p99 in milliseconds.
void PrintStats(const v1::GetStatsResponse& stats, std::ostream& out);

// Prints `message` as one protobuf JSON object and a newline: the .proto's field names, fields at
// their default value included (a script can read "calls_in_flight" when it is 0), int64 values
// as strings as protobuf JSON has them.
void PrintJson(const google::protobuf::Message& message, std::ostream& out);

// Calls GetStats on `channel` (with options' deadline and token) and prints it to stdout, as
// PrintStats does or, with `json`, as PrintJson does. Returns the process exit code: 0, or 1
// with the error ("GetStats failed: CODE_NAME: message") on stderr.
int RunStatsCommand(const std::shared_ptr<grpc::Channel>& channel, const ClientOptions& options,
                    bool json = false);

}  // namespace gradserve::client

#endif  // GRADSERVE_CLIENT_STATS_COMMAND_H_
