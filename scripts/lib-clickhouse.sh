# Sourced by the benchmark scripts: a private ClickHouse server (Debian's clickhouse-server) on
# 127.0.0.1 with its data in a folder of the caller's.
#   start_clickhouse DIR   starts it with its data, logs and config under DIR/ch, waits for
#                          /ping, and sets chhttp, chtcp (its ports), chpid and ch_extra (the
#                          guardian server's [clickhouse] section; BENCH_CLICKHOUSE_EXTRA adds
#                          lines to it). The caller stops chpid.
# A free loopback port (the callers define the same; defined here when they have not yet).
declare -F free_port >/dev/null || free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_clickhouse() {
  local d=$1/ch
  chhttp=$(free_port); chtcp=$(free_port)
  mkdir -p "$d/log" "$d/data" "$d/tmp"
  cat >"$d/config.xml" <<XML
<yandex>
  <logger><level>warning</level><log>$d/log/server.log</log><errorlog>$d/log/err.log</errorlog></logger>
  <http_port>$chhttp</http_port><tcp_port>$chtcp</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>$d/data/</path><tmp_path>$d/tmp/</tmp_path>
  <users_config>/etc/clickhouse-server/users.xml</users_config>
  <default_profile>default</default_profile><default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
</yandex>
XML
  clickhouse-server --config-file="$d/config.xml" >/dev/null 2>&1 &
  chpid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$chhttp/ping" >/dev/null && break; sleep 0.1; done
  if ! curl -sf "http://127.0.0.1:$chhttp/ping" >/dev/null; then
    echo "clickhouse-server did not answer on 127.0.0.1:$chhttp within 10 s; its log:" >&2
    tail -20 "$d/log/err.log" >&2 2>/dev/null || true
    return 1
  fi
  ch_extra="[clickhouse]
url = \"http://127.0.0.1:$chhttp\"
database = \"guardian\"
${BENCH_CLICKHOUSE_EXTRA:-}"
}
