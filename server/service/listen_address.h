// Listen addresses: the one parser behind --listen and --metrics-listen, and the one place that
// says in words why an address could not be bound.
#ifndef GRADSERVE_SERVICE_LISTEN_ADDRESS_H_
#define GRADSERVE_SERVICE_LISTEN_ADDRESS_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace gradserve::service {

// Loopback: where an address without a host binds.
inline constexpr char kDefaultListenHost[] = "127.0.0.1";

struct HostPort {
  std::string host;  // A name, an IPv4 address or an IPv6 address without its brackets.
  int port = 0;      // 0 to 65535; 0 lets the kernel pick a free port.

  // HOST:PORT, or [HOST]:PORT for an IPv6 address: what gRPC's AddListeningPort takes.
  std::string ToString() const;
};

// Parses HOST:PORT, [IPV6]:PORT, :PORT or PORT; without a host it is kDefaultListenHost. HOST is
// a name or an IPv4 address (letters, digits, '.', '-', '_'); an IPv6 address needs its
// brackets. INVALID_ARGUMENT for anything else, its message starting with `what` (the flag or
// field the address came from) and quoting `address`.
absl::StatusOr<HostPort> ParseListenAddress(std::string_view address, std::string_view what);

// Why `address` cannot be listened on, found by binding a socket of our own there (with
// SO_REUSEADDR, as the servers do): e.g. "127.0.0.1:50051 is already in use by another process".
// Empty if that bind succeeds, i.e. the cause is not the address (a TLS key gRPC refuses, say).
// Call it only after a listener failed: it binds the port for a moment.
std::string DescribeBindFailure(const HostPort& address);

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_LISTEN_ADDRESS_H_
