# Sourced by the end-to-end scripts: start a gradserve on a free loopback port and stop it.
#
#   start_server SERVER_BINARY [EXTRA_FLAGS...]   sets server_pid and port; --shutdown-grace 5
#                                                 unless EXTRA_FLAGS give their own
#   stop_server                                   SIGTERM; returns the server's exit status
#
# The server listens on port 0 so that parallel CTest runs never collide; the kernel's choice
# is read back from the server's "listening on ... (port N)" start-up line.

server_log="$(mktemp -t gradserve-e2e-XXXXXX.log)"
server_pid=""
port=""

_server_cleanup() {
  # Only reached with a live server if something failed before stop_server.
  if [[ -n "${server_pid}" ]] && kill -0 "${server_pid}" 2>/dev/null; then
    kill -KILL "${server_pid}" 2>/dev/null || true
    wait "${server_pid}" 2>/dev/null || true
  fi
  rm -f "${server_log}"
}
trap _server_cleanup EXIT

start_server() {
  local server_bin="$1"
  shift
  # gradserve refuses a flag given twice, so the default grace only goes in when not overridden.
  local default_grace=(--shutdown-grace 5)
  local arg
  for arg in "$@"; do
    if [[ "${arg}" == --shutdown-grace* ]]; then default_grace=(); fi
  done
  "${server_bin}" --listen 127.0.0.1:0 "${default_grace[@]}" "$@" >"${server_log}" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do  # up to 10 s
    if ! kill -0 "${server_pid}" 2>/dev/null; then
      echo "gradserve exited during start-up:" >&2
      cat "${server_log}" >&2
      return 1
    fi
    port="$(sed -n 's/.* listening on .*(port \([0-9][0-9]*\)).*/\1/p' "${server_log}" | head -n 1)"
    [[ -n "${port}" ]] && break
    sleep 0.1
  done
  if [[ -z "${port}" ]]; then
    echo "gradserve did not report a listening port within 10 s:" >&2
    cat "${server_log}" >&2
    return 1
  fi
  echo "gradserve (pid ${server_pid}) listening on 127.0.0.1:${port}"
}

stop_server() {
  kill -TERM "${server_pid}"
  local rc=0
  wait "${server_pid}" || rc=$?
  server_pid=""
  if [[ ${rc} -ne 0 ]]; then
    echo "gradserve exited with status ${rc} after SIGTERM (expected 0); its log:" >&2
    cat "${server_log}" >&2
  fi
  return ${rc}
}
