#include "server/service/listen_address.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace gradserve::service {
namespace {

bool IsHostName(std::string_view host) {
  for (char c : host) {
    if (!absl::ascii_isalnum(c) && c != '.' && c != '-' && c != '_') return false;
  }
  return true;
}

// Inside the brackets: hex digits, ':', '.' (an IPv4 tail) and a %zone (letters, digits).
bool IsBracketedIpv6(std::string_view host) {
  if (host.find(':') == std::string_view::npos) return false;
  for (char c : host) {
    if (!absl::ascii_isalnum(c) && c != ':' && c != '.' && c != '%') return false;
  }
  return true;
}

}  // namespace

std::string HostPort::ToString() const {
  return host.find(':') == std::string::npos ? absl::StrCat(host, ":", port)
                                             : absl::StrCat("[", host, "]:", port);
}

absl::StatusOr<HostPort> ParseListenAddress(std::string_view address, std::string_view what) {
  const auto invalid = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(what), " \"", std::string(address),
                     "\": expected PORT, :PORT, HOST:PORT or [IPV6]:PORT with PORT in 0-65535"));
  };
  HostPort out;
  std::string_view host;
  std::string_view port = address;
  if (const size_t colon = address.rfind(':'); colon != std::string_view::npos) {
    host = address.substr(0, colon);
    port = address.substr(colon + 1);
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
    if (!IsBracketedIpv6(host)) return invalid();
  } else if (!IsHostName(host)) {
    return invalid();  // Includes an IPv6 address without its brackets.
  }
  out.host = host.empty() ? kDefaultListenHost : std::string(host);
  const auto [end, error] = std::from_chars(port.data(), port.data() + port.size(), out.port);
  if (port.empty() || error != std::errc() || end != port.data() + port.size() || out.port < 0 ||
      out.port > 65535) {
    return invalid();
  }
  return out;
}

std::string DescribeBindFailure(const HostPort& address) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(address.port);
  if (const int error = getaddrinfo(address.host.c_str(), port.c_str(), &hints, &found);
      error != 0) {
    return absl::StrCat(address.ToString(), ": ", address.host,
                        " does not resolve: ", gai_strerror(error));
  }
  int bind_errno = 0;
  for (const addrinfo* ai = found; ai != nullptr && bind_errno == 0; ai = ai->ai_next) {
    const int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) continue;
    const int yes = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) bind_errno = errno;
    close(fd);
  }
  freeaddrinfo(found);
  switch (bind_errno) {
    case 0:
      return "";
    case EADDRINUSE:
      return absl::StrCat(address.ToString(), " is already in use by another process");
    case EADDRNOTAVAIL:
      return absl::StrCat(address.ToString(), ": ", address.host,
                          " is not an address of this machine");
    case EACCES:
      return absl::StrCat(address.ToString(), ": permission denied (a port below 1024?)");
    default:
      return absl::StrCat(address.ToString(), ": ", std::strerror(bind_errno));
  }
}

}  // namespace gradserve::service
