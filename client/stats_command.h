// `gradclient stats`: the server's GetStats as a table.
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

// Calls GetStats on `channel` (with options' deadline and token) and prints it to stdout.
// Returns the process exit code: 0, or 1 with the error on stderr.
int RunStatsCommand(const std::shared_ptr<grpc::Channel>& channel, const ClientOptions& options);

}  // namespace gradserve::client

#endif  // GRADSERVE_CLIENT_STATS_COMMAND_H_
