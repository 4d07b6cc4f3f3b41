#!/bin/sh
# Starts a throwaway ClickHouse server on loopback for manual runs or CI.
# The aggregator's tests start their own servers (free ports, temp dirs) via
# tests/common/clickhouse_server.rs and need only `clickhouse-server` on PATH;
# this script writes the same minimal config.
#
# usage: clickhouse-test-server.sh DIR [HTTP_PORT] [TCP_PORT]
#   then: APERTURE_CLICKHOUSE_ENDPOINT=http://127.0.0.1:HTTP_PORT
#   stop:  kill "$(cat DIR/server.pid)"
set -eu
dir=${1:?usage: clickhouse-test-server.sh DIR [HTTP_PORT] [TCP_PORT]}
http_port=${2:-8123}
tcp_port=${3:-9000}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cat > "$dir/config.xml" <<XML
<yandex>
    <logger><level>warning</level><console>1</console></logger>
    <http_port>$http_port</http_port>
    <tcp_port>$tcp_port</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <max_concurrent_queries>50</max_concurrent_queries>
</yandex>
XML
cat > "$dir/users.xml" <<'XML'
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
cd "$dir"
clickhouse-server --config-file="$dir/config.xml" > "$dir/server.log" 2>&1 &
echo $! > "$dir/server.pid"
i=0
until curl -fsS "http://127.0.0.1:$http_port/ping" > /dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then
        echo "clickhouse-server did not answer on 127.0.0.1:$http_port within 30 s; see $dir/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "clickhouse-server $(curl -fsS "http://127.0.0.1:$http_port/?query=SELECT%20version()") on http://127.0.0.1:$http_port (pid $(cat "$dir/server.pid"))"
