#!/usr/bin/env bash
# Benchmarks Ferrite against InfluxDB 1.6, VictoriaMetrics and Mosquitto on
# this machine and writes the results into docs/benchmarks.md.
#
# The figures, measured in one session (lp and mqtt alternate between the
# systems, ROUNDS runs each; memory and durability run once per system):
#   lp          HTTP line-protocol ingest in points/s. Systems: Ferrite, InfluxDB, VictoriaMetrics.
#   mqtt        MQTT QoS 1 PUBACKs/s from 100 publishing connections. Systems: Ferrite, Mosquitto.
#   memory      VmRSS of the server with 10,000 idle MQTT connections. Systems: Ferrite, Mosquitto.
#   durability  Lines found after SIGKILL right after an acknowledged batch. Systems: Ferrite, InfluxDB, VictoriaMetrics.
# One more Ferrite line-protocol run under `perf record` shows where its time goes.
#
# The storage scenario loads one IoT fleet dataset (written once by
# `ferrite-bench generate`, STORAGE_DEVICES trucks over STORAGE_DURATION) into
# a fresh instance of each system, ROUNDS times with the order of the systems
# rotated each round, and measures for each load:
#   ingest   field values/s of `lp --dataset` (the whole file once).
#   disk     bytes on disk per field value after the system compacted its data.
#   memory   VmRSS of the server right after the ingest.
#   queries  median and p99 latency of the IoT query set (`ferrite-bench queries`)
#            and the size of each result, checked against the generator.
# The same dataset sent to `ferrite-bench sink`, which discards it, shows the
# generator's own ceiling. These results go to their own block of the page.
#
# The series scenario loads SERIES_DEVICES trucks (default 142,858, whose 7
# fields make 1,000,006 series) with SERIES_ROUNDS points per series into a
# fresh instance of each system, once per system. It records the ingest rate
# in field values/s, VmRSS right after the load and again after
# SERIES_SETTLE_S seconds without load, and VmHWM (the peak). Ferrite runs
# with storage.memory_budget_bytes set from SERIES_MEMORY_BUDGET. These
# results go to a block of their own too.
#
# Every server is started by this script on 127.0.0.1 with free ports and a
# data directory under a temporary folder, and stopped by its process id.
# Peers missing from the machine are installed with apt-get (run as root).
# The live scenario (Ferrite only) measures the latency from an MQTT
# publish to its delivery on a live WebSocket. LIVE_DEVICES connections
# publish QoS 1 messages at LIVE_RATE messages/s in total for
# LIVE_DURATION_S seconds. One subscriber compares each message's receive
# time with the send time it carries. It runs ROUNDS times, each on
# a fresh server, and its results go to a block of their own.
#
# The coap scenario (Ferrite only) has COAP_DEVICES simulated devices send
# Confirmable CoAP telemetry, one request outstanding each, for
# COAP_DURATION_S seconds. On the same server the same number of MQTT
# connections then publish QoS 1 with one message in flight each, so the
# two rows compare the protocols under the same per-device rule. It runs
# ROUNDS times and its results go to a block of their own with the ratio
# of CoAP to MQTT.
#
# The lorawan scenario (Ferrite only) finds the highest rate of LoRaWAN
# uplinks that Ferrite decodes and stores as fast as they arrive.
# `ferrite-bench lorawan` registers LORAWAN_DEVICES ABP devices with a
# Cayenne LPP profile, at least one device per uplink/s of the rate. It
# sends their uplinks through one simulated Semtech UDP gateway, one
# uplink per PUSH_DATA datagram, paced to each rate of LORAWAN_RATES for
# LORAWAN_SEND_S seconds. A run counts as kept up when every uplink got
# its PUSH_ACK and was decoded and stored, the last one within
# LORAWAN_MAX_LAG_S seconds after the last datagram. Each rate starts a
# fresh server, and a round stops at its first rate that was not kept up.
# It runs ROUNDS times and its results go to a block of their own.
#
# Settings come from the environment. With the defaults a full run took
# about 7 minutes on 2 cores after the release build, and the wait for a
# quiet machine adds up to QUIET_WAIT_S seconds before each timed run. The
# storage scenario comes on top: at its default size with ROUNDS=2 it took
# about 15 minutes for the three systems. The series scenario at full size
# took about 5 minutes for the three systems.
#
# Usage: bench/run.sh            (from anywhere inside the repository)
#        ROUNDS=5 bench/run.sh   (more runs per system)
#        SCENARIOS=storage SYSTEMS="influxdb victoriametrics" STORAGE_DEVICES=20 STORAGE_DURATION=1h bench/run.sh
#        SCENARIOS=series bench/run.sh
#        SCENARIOS=live bench/run.sh
#        SCENARIOS=coap COAP_DEVICES=50 COAP_DURATION_S=3 ROUNDS=1 bench/run.sh
#        SCENARIOS=lorawan LORAWAN_RATES="500 1000" LORAWAN_SEND_S=3 ROUNDS=1 bench/run.sh
#        BUILD=0 SCENARIOS="coap lorawan" SYSTEMS=ferrite bench/run.sh   (binaries built already)

set -euo pipefail

ROUNDS=${ROUNDS:-3}                   # runs per system for lp, mqtt and storage
LP_CONNECTIONS=${LP_CONNECTIONS:-4}
LP_BATCH_LINES=${LP_BATCH_LINES:-5000}
LP_BATCHES=${LP_BATCHES:-300}         # timed batches per run
LP_MAX_DURATION_S=${LP_MAX_DURATION_S:-40}
LP_DEVICES=${LP_DEVICES:-1000}
MQTT_CONNECTIONS=${MQTT_CONNECTIONS:-100}
MQTT_INFLIGHT=${MQTT_INFLIGHT:-20}
MQTT_DURATION_S=${MQTT_DURATION_S:-15}
MQTT_DEVICES=${MQTT_DEVICES:-100}     # devices created in Ferrite; connections reuse their tokens
COAP_DEVICES=${COAP_DEVICES:-1000}    # simulated CoAP devices; tokens are reused past MQTT_DEVICES
COAP_DURATION_S=${COAP_DURATION_S:-15}
LORAWAN_DEVICES=${LORAWAN_DEVICES:-1000}          # simulated ABP devices behind one gateway, raised to the rate
LORAWAN_RATES=${LORAWAN_RATES:-"1000 2000 3000 4000 6000 8000"}  # offered uplinks/s, tried in this order
LORAWAN_SEND_S=${LORAWAN_SEND_S:-15}              # seconds of sending at each rate
LORAWAN_MAX_LAG_S=${LORAWAN_MAX_LAG_S:-2}         # allowed delay of the last stored uplink after the last datagram
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
IDLE_SETTLE_S=${IDLE_SETTLE_S:-10}    # wait after the last CONNACK before reading VmRSS
GENERATOR_TIMEOUT_S=${GENERATOR_TIMEOUT_S:-300}  # backstop for one generator process
QUIET_WAIT_S=${QUIET_WAIT_S:-30}      # maximum wait before a run for other processes to go quiet
KEEP_WORK=${KEEP_WORK:-0}             # 1 keeps the temporary folder with logs and data
BUILD=${BUILD:-1}                     # 0 runs the release binaries in target/release without building them
# Scenarios to run, from: lp durability mqtt memory profile storage series live coap lorawan.
SCENARIOS=${SCENARIOS:-lp durability mqtt memory profile storage series live coap lorawan}
# Systems to run, from: ferrite influxdb victoriametrics mosquitto. Each
# scenario runs the systems of its own list that are named here.
SYSTEMS=${SYSTEMS:-ferrite influxdb victoriametrics mosquitto}
# 1,000 trucks over 1d are 17.1 M lines, 85.5 M field values and 3.0 GB of line protocol.
STORAGE_DEVICES=${STORAGE_DEVICES:-1000}            # trucks of the fleet dataset
STORAGE_DURATION=${STORAGE_DURATION:-1d}            # time span of the dataset, one report per truck every 10 s
STORAGE_START=${STORAGE_START:-2026-01-01T00:00:00Z}
STORAGE_SEED=${STORAGE_SEED:-1}
STORAGE_BATCH_LINES=${STORAGE_BATCH_LINES:-5000}
STORAGE_CONNECTIONS=${STORAGE_CONNECTIONS:-4}
STORAGE_MAX_DURATION_S=${STORAGE_MAX_DURATION_S:-1800}  # bound of one dataset ingest
COMPACT_TIMEOUT_S=${COMPACT_TIMEOUT_S:-900}         # maximum wait for a system to finish compacting
QUERY_ROUNDS=${QUERY_ROUNDS:-20}                    # timed rounds of the query set per load
# The series scenario sends its batches of at most LP_BATCH_LINES lines over LP_CONNECTIONS connections.
SERIES_DEVICES=${SERIES_DEVICES:-142858}            # trucks; each has 7 series, one per field
SERIES_ROUNDS=${SERIES_ROUNDS:-10}                  # points per series
SERIES_SETTLE_S=${SERIES_SETTLE_S:-30}              # wait without load before the second VmRSS reading
# Bound of the timed load. It leaves 90 s of GENERATOR_TIMEOUT_S for generating
# the batches and for the requests in flight at the bound (60 s timeout each).
SERIES_MAX_DURATION_S=${SERIES_MAX_DURATION_S:-$((GENERATOR_TIMEOUT_S - 90))}
# Ferrite's storage.memory_budget_bytes for the series scenario, in bytes or
# with a suffix KiB, MiB or GiB such as "1GiB". Set it empty to leave the key
# out of the configuration file.
SERIES_MEMORY_BUDGET=${SERIES_MEMORY_BUDGET-1GiB}
LIVE_DEVICES=${LIVE_DEVICES:-100}        # publishing MQTT connections; tokens are reused past MQTT_DEVICES
LIVE_RATE=${LIVE_RATE:-10000}            # messages/s over all connections
LIVE_DURATION_S=${LIVE_DURATION_S:-20}   # measured seconds, after a 2 s warm-up

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS_PAGE=${RESULTS_PAGE:-$REPO/docs/benchmarks.md}
FERRITE="$REPO/target/release/ferrite"
BENCH="$REPO/target/release/ferrite-bench"
WORK=$(mktemp -d /tmp/ferrite-bench.XXXXXX)
RESULTS="$WORK/results.jsonl"
COMMANDS="$WORK/commands.txt"
STORAGE_RESULTS="$WORK/storage-results.jsonl"
STORAGE_COMMANDS="$WORK/storage-commands.txt"
SERIES_RESULTS="$WORK/series-results.jsonl"
SERIES_COMMANDS="$WORK/series-commands.txt"
LIVE_RESULTS="$WORK/live-results.jsonl"
LIVE_COMMANDS="$WORK/live-commands.txt"
COAP_RESULTS="$WORK/coap-results.jsonl"
COAP_COMMANDS="$WORK/coap-commands.txt"
LORAWAN_RESULTS="$WORK/lorawan-results.jsonl"
LORAWAN_COMMANDS="$WORK/lorawan-commands.txt"
DATASET="$WORK/fleet.lp"
FERRITE_TEMPLATE="$WORK/ferrite-template"   # data directory copied by start_ferrite
FERRITE_CONFIG_FILE=""                      # configuration file for start_ferrite; none when empty
INFLUXDB_DATA_SETTINGS=""                   # extra [data] settings for start_influxdb
START_WAIT_S=30                             # maximum wait for a started server to listen
CLOCK_TICKS=$(getconf CLK_TCK)
STARTED_PIDS=()
SERVER_PID=""
SERVER_LOG=/dev/null
SYNC_COUNTER_PID=""
SYNC_COUNT=null
SERVER_CPU=null
CLIENT_CPU=null
OTHER_CPU=null

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${STARTED_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ "$KEEP_WORK" == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- setup ---

install_missing() {
    local missing=()
    command -v influxd >/dev/null || missing+=(influxdb)
    command -v victoria-metrics >/dev/null || missing+=(victoria-metrics)
    [[ -x /usr/sbin/mosquitto ]] || missing+=(mosquitto)
    [[ -x /usr/bin/time ]] || missing+=(time)
    command -v jq >/dev/null || missing+=(jq)
    command -v curl >/dev/null || missing+=(curl)
    command -v ss >/dev/null || missing+=(iproute2)
    command -v perf >/dev/null || missing+=(linux-perf)
    if ((${#missing[@]} > 0)); then
        log "installing ${missing[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Prints a loopback TCP port that no socket uses right now. Ports come from
# below the kernel's ephemeral range, because the generators' outgoing
# connections leave ports of that range in TIME-WAIT, where a server cannot
# bind them.
free_port() {
    local low port
    low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range)
    ((low > 12000)) || die "the ephemeral port range starts at $low; this script needs free ports below it"
    for _ in $(seq 1 100); do
        port=$((RANDOM % (low - 11000) + 10000))
        if [[ -z "$(ss -Htan "sport = :$port")" ]]; then
            echo "$port"
            return
        fi
    done
    die "found no free loopback port"
}

# Stops the script with the end of the server's log.
die_with_log() {
    log "last lines of $SERVER_LOG:"
    tail -n 20 "$SERVER_LOG" >&2 || true
    die "$*"
}

wait_tcp() {
    local port=$1 name=$2
    for _ in $(seq 1 $((START_WAIT_S * 10))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || die_with_log "$name exited during start-up"
        sleep 0.1
    done
    die_with_log "$name did not listen on 127.0.0.1:$port within $START_WAIT_S s"
}

wait_http() {
    local url=$1 name=$2
    for _ in $(seq 1 $((START_WAIT_S * 10))); do
        if curl -fs -o /dev/null "$url"; then
            return
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || die_with_log "$name exited during start-up"
        sleep 0.1
    done
    die_with_log "$name did not answer $url within $START_WAIT_S s"
}

# CPU seconds (user + system, all threads) used so far by process $1.
cpu_seconds() {
    awk -v ticks="$CLOCK_TICKS" '{ printf "%.2f", ($14 + $15) / ticks }' "/proc/$1/stat"
}

# CPU seconds that all processes of the machine have used since boot, from
# /proc/stat (user, nice, system, irq, softirq and steal time).
machine_cpu_seconds() {
    awk -v ticks="$CLOCK_TICKS" '/^cpu / { printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / ticks }' /proc/stat
}

# Waits up to $QUIET_WAIT_S seconds until the machine's CPUs were less than
# 10 % busy for 2 s, so that other work on a shared machine disturbs the next
# run less. A run that starts on a busy machine shows it in "other processes CPU s".
wait_for_quiet_machine() {
    local waited=0 before busy
    while ((waited < QUIET_WAIT_S)); do
        before=$(machine_cpu_seconds)
        sleep 2
        waited=$((waited + 2))
        busy=$(awk -v before="$before" -v after="$(machine_cpu_seconds)" -v cpus="$(nproc)" \
            'BEGIN { print ((after - before) / 2 / cpus < 0.10) ? "no" : "yes" }')
        [[ $busy == no ]] && return 0
    done
    log "the machine is still busy after ${QUIET_WAIT_S} s; starting the run anyway"
}

rss_kib() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# The peak VmRSS of process $1 since it started, in KiB.
hwm_kib() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

# Stops the server started last, by its process id: SIGTERM, then SIGKILL
# after $1 seconds (default 30).
stop_server() {
    local pid=$SERVER_PID grace=${1:-30}
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((grace * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid did not stop within $grace s of SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    SERVER_PID=""
}

# Records fsync and fdatasync calls of all processes with perf. Recording
# system wide includes the server threads that start later. stop_sync_counter
# sets SYNC_COUNT to the calls made by the server process (null without perf).
start_sync_counter() {
    SYNC_COUNTER_PID=""
    command -v perf >/dev/null || return 0
    perf record -q -a -e syscalls:sys_enter_fsync -e syscalls:sys_enter_fdatasync \
        -o "$WORK/syncs.data" 2>>"$WORK/logs/perf.log" &
    SYNC_COUNTER_PID=$!
    STARTED_PIDS+=("$SYNC_COUNTER_PID")
    sleep 0.5
}

stop_sync_counter() {
    SYNC_COUNT=null
    [[ -n "$SYNC_COUNTER_PID" ]] || return 0
    kill -INT "$SYNC_COUNTER_PID"
    wait "$SYNC_COUNTER_PID" 2>/dev/null || true
    SYNC_COUNT=$(perf script -i "$WORK/syncs.data" -F pid 2>/dev/null |
        awk -v pid="$SERVER_PID" '$1 == pid { n++ } END { print n + 0 }')
}

# Sets SERVER_CPU, CLIENT_CPU and OTHER_CPU (seconds) for the run that just
# ended: the server's CPU since $1, the generator's from /usr/bin/time, and
# what all other processes of the machine used since $2 (other builds, perf).
measure_cpu() {
    local server_before=$1 machine_before=$2
    SERVER_CPU=$(awk -v before="$server_before" -v after="$(cpu_seconds "$SERVER_PID")" 'BEGIN { printf "%.2f", after - before }')
    CLIENT_CPU=$(awk '{ printf "%.2f", $1 + $2 }' "$WORK/time")
    OTHER_CPU=$(awk -v before="$machine_before" -v after="$(machine_cpu_seconds)" \
        -v server="$SERVER_CPU" -v client="$CLIENT_CPU" 'BEGIN { printf "%.2f", after - before - server - client }')
}

# Records a command line once per label, for the results page, with the
# temporary folder written as $WORK.
note_command() {
    local label=$1
    shift
    local line="$*"
    grep -q "^$label: " "$COMMANDS" 2>/dev/null || echo "$label: ${line//$WORK/\$WORK}" >>"$COMMANDS"
}

# ---------------------------------------------------------------- servers ---

# A data directory with an operator API key and $MQTT_DEVICES devices, made
# once with the CLI and copied for every Ferrite run.
prepare_ferrite_template() {
    local template="$WORK/ferrite-template"
    mkdir -p "$template"
    "$FERRITE" api-key create bench --role operator --data-dir "$template" | jq -r .key >"$WORK/api-key"
    : >"$WORK/tokens"
    for index in $(seq 0 $((MQTT_DEVICES - 1))); do
        "$FERRITE" device create "bench-device-$index" --data-dir "$template" | jq -r .token >>"$WORK/tokens"
    done
    log "Ferrite template: an operator API key and $(wc -l <"$WORK/tokens") devices"
}

# A data directory with only an admin API key, for the storage, series and
# lorawan scenarios: the trucks or the LoRaWAN devices become its only
# devices.
prepare_ferrite_storage_template() {
    local template="$WORK/ferrite-storage-template"
    mkdir -p "$template"
    "$FERRITE" api-key create bench-admin --role admin --data-dir "$template" | jq -r .key >"$WORK/admin-key"
}

# Each start_<system> NAME [reuse] starts a server on new free ports with the
# data directory $WORK/run/<system>-NAME, made fresh unless "reuse" is given,
# and sets SERVER_PID, SERVER_LOG and HTTP_PORT or MQTT_PORT. Ferrite's fresh
# directory is a copy of $FERRITE_TEMPLATE, and Ferrite reads the
# configuration file $FERRITE_CONFIG_FILE when that is set.

start_ferrite() {
    local dir="$WORK/run/ferrite-$1"
    if [[ "${2:-}" != reuse ]]; then
        rm -rf "$dir"
        mkdir -p "$(dirname "$dir")"
        cp -a "$FERRITE_TEMPLATE" "$dir"
    fi
    HTTP_PORT=$(free_port)
    MQTT_PORT=$(free_port)
    # The CoAP, CoAP over DTLS and LoRaWAN ports are UDP; a TCP port free
    # below the ephemeral range is as good a guess.
    COAP_PORT=$(free_port)
    COAPS_PORT=$(free_port)
    LORAWAN_PORT=$(free_port)
    local config=()
    [[ -z "$FERRITE_CONFIG_FILE" ]] || config=(--config "$FERRITE_CONFIG_FILE")
    # A 5,000-line batch is about 1.08 MB, and the default body limit is 256 KiB.
    FERRITE_HTTP_MAX_BODY_BYTES=16777216 FERRITE_LOG_LEVEL=warn \
        "$FERRITE" serve --data-dir "$dir" "${config[@]}" \
        --http-listen "127.0.0.1:$HTTP_PORT" --mqtt-listen "127.0.0.1:$MQTT_PORT" \
        --coap-listen "127.0.0.1:$COAP_PORT" --coaps-listen "127.0.0.1:$COAPS_PORT" \
        --lorawan-listen "127.0.0.1:$LORAWAN_PORT" \
        >>"$WORK/logs/ferrite.log" 2>&1 &
    SERVER_PID=$!
    SERVER_LOG="$WORK/logs/ferrite.log"
    STARTED_PIDS+=("$SERVER_PID")
    wait_http "http://127.0.0.1:$HTTP_PORT/healthz" ferrite
    wait_tcp "$MQTT_PORT" ferrite
}

start_influxdb() {
    local dir="$WORK/run/influxdb-$1"
    [[ "${2:-}" == reuse ]] || rm -rf "$dir"
    mkdir -p "$dir"
    HTTP_PORT=$(free_port)
    local rpc_port
    rpc_port=$(free_port)
    cat >"$dir/influxdb.conf" <<EOF
reporting-enabled = false
bind-address = "127.0.0.1:$rpc_port"
[meta]
  dir = "$dir/meta"
  logging-enabled = false
[data]
  dir = "$dir/data"
  wal-dir = "$dir/wal"
  query-log-enabled = false
$INFLUXDB_DATA_SETTINGS
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[retention]
  enabled = false
[shard-precreation]
  enabled = false
[ifql]
  enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:$HTTP_PORT"
  log-enabled = false
  pprof-enabled = false
[logging]
  level = "warn"
EOF
    influxd run -config "$dir/influxdb.conf" >>"$WORK/logs/influxdb.log" 2>&1 &
    SERVER_PID=$!
    SERVER_LOG="$WORK/logs/influxdb.log"
    STARTED_PIDS+=("$SERVER_PID")
    wait_http "http://127.0.0.1:$HTTP_PORT/ping" influxdb
    curl -fsS -o /dev/null -XPOST "http://127.0.0.1:$HTTP_PORT/query" --data-urlencode "q=CREATE DATABASE bench"
}

start_victoriametrics() {
    local dir="$WORK/run/victoriametrics-$1"
    [[ "${2:-}" == reuse ]] || rm -rf "$dir"
    mkdir -p "$dir"
    HTTP_PORT=$(free_port)
    # The default retention of one month would drop the fleet dataset, whose
    # timestamps start on a fixed date.
    victoria-metrics -httpListenAddr="127.0.0.1:$HTTP_PORT" -storageDataPath="$dir" \
        -retentionPeriod=100y -loggerLevel=WARN >>"$WORK/logs/victoriametrics.log" 2>&1 &
    SERVER_PID=$!
    SERVER_LOG="$WORK/logs/victoriametrics.log"
    STARTED_PIDS+=("$SERVER_PID")
    wait_http "http://127.0.0.1:$HTTP_PORT/health" victoriametrics
}

start_mosquitto() {
    local dir="$WORK/run/mosquitto-$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    MQTT_PORT=$(free_port)
    cat >"$dir/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
EOF
    /usr/sbin/mosquitto -c "$dir/mosquitto.conf" >>"$WORK/logs/mosquitto.log" 2>&1 &
    SERVER_PID=$!
    SERVER_LOG="$WORK/logs/mosquitto.log"
    STARTED_PIDS+=("$SERVER_PID")
    wait_tcp "$MQTT_PORT" mosquitto
}

# Prints the points the server reports as written, which shows whether any
# were dropped silently, and the seconds it took to get there. The sources are
# Ferrite's pipeline counter, InfluxDB's point requests times 7 fields and
# VictoriaMetrics' inserted rows (one per field). Ferrite's counter trails
# the acknowledgements, so it is polled until it reaches $2 or 60 s pass.
stored_points() {
    local system=$1 expected=$2
    case $system in
        ferrite)
            local count=0 started
            started=$(date +%s.%N)
            for _ in $(seq 1 600); do
                count=$(curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" |
                    awk '/^ferrite_pipeline_points_total/ { print $2 }')
                count=${count:-0}
                ((count >= expected)) && break
                sleep 0.1
            done
            echo "$count $(awk -v started="$started" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - started }')"
            ;;
        influxdb)
            echo "$(curl -fs "http://127.0.0.1:$HTTP_PORT/debug/vars" | jq '.write.values.pointReq * 7') null"
            ;;
        victoriametrics)
            echo "$(curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" |
                awk '/^vm_rows_inserted_total\{type="influx"\}/ { print $2 }') null"
            ;;
    esac
}

# ---------------------------------------------------------------- figures ---

lp_url() {
    case $1 in
        ferrite) echo "http://127.0.0.1:$HTTP_PORT/write?precision=ns&device_tag=name" ;;
        influxdb) echo "http://127.0.0.1:$HTTP_PORT/write?db=bench&precision=ns" ;;
        victoriametrics) echo "http://127.0.0.1:$HTTP_PORT/write?precision=ns" ;;
    esac
}

# Runs one timed line-protocol load against a fresh instance of $1.
run_lp() {
    local system=$1 round=$2
    "start_$system" "$round"
    wait_for_quiet_machine
    local args=(lp --url "$(lp_url "$system")" --connections "$LP_CONNECTIONS"
        --batch-lines "$LP_BATCH_LINES" --batches "$LP_BATCHES" --devices "$LP_DEVICES"
        --max-duration-s "$LP_MAX_DURATION_S" --start-s "$LP_START_S" --label "$system")
    local token=()
    if [[ $system == ferrite ]]; then
        token=(--token "$(cat "$WORK/api-key")")
        # The key is written as the literal text $API_KEY on purpose.
        # shellcheck disable=SC2016
        note_command "lp $system" ferrite-bench "${args[@]}" --token '$API_KEY'
    else
        note_command "lp $system" ferrite-bench "${args[@]}"
    fi

    start_sync_counter
    local cpu_before machine_before
    cpu_before=$(cpu_seconds "$SERVER_PID")
    machine_before=$(machine_cpu_seconds)
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" "${token[@]}" >"$WORK/line" ||
        die_with_log "the lp run against $system failed"
    measure_cpu "$cpu_before" "$machine_before"
    stop_sync_counter
    local expected stored catch_up
    expected=$(jq '(.batches_ok + .warmup_batches) * .batch_lines * .fields_per_line' "$WORK/line")
    read -r stored catch_up < <(stored_points "$system" "$expected")
    jq -c --argjson server "$SERVER_CPU" --argjson client "$CLIENT_CPU" --argjson other "$OTHER_CPU" \
        --argjson round "$round" --argjson syncs "$SYNC_COUNT" \
        --argjson stored "${stored:-null}" --argjson expected "$expected" --argjson catch_up "${catch_up:-null}" \
        '. + {round: $round, server_cpu_s: $server, client_cpu_s: $client, other_cpu_s: $other, server_syncs: $syncs,
              points_sent_with_warmup: $expected, points_reported_by_server: $stored,
              store_catch_up_s: $catch_up}' \
        "$WORK/line" | tee -a "$RESULTS" >&2
    stop_server
}

run_mqtt() {
    local system=$1 round=$2
    "start_$system" "$round"
    wait_for_quiet_machine
    local args=(mqtt --addr "127.0.0.1:$MQTT_PORT" --tokens-file "$WORK/tokens"
        --connections "$MQTT_CONNECTIONS" --inflight "$MQTT_INFLIGHT"
        --duration-s "$MQTT_DURATION_S" --label "$system")
    note_command "mqtt $system" ferrite-bench "${args[@]}"

    start_sync_counter
    local cpu_before machine_before
    cpu_before=$(cpu_seconds "$SERVER_PID")
    machine_before=$(machine_cpu_seconds)
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" >"$WORK/line" ||
        die_with_log "the mqtt run against $system failed"
    measure_cpu "$cpu_before" "$machine_before"
    stop_sync_counter
    jq -c --argjson server "$SERVER_CPU" --argjson client "$CLIENT_CPU" --argjson other "$OTHER_CPU" \
        --argjson round "$round" --argjson syncs "$SYNC_COUNT" \
        '. + {round: $round, server_cpu_s: $server, client_cpu_s: $client, other_cpu_s: $other, server_syncs: $syncs}' \
        "$WORK/line" | tee -a "$RESULTS" >&2
    stop_server
}

# One round of the coap scenario: on one Ferrite server, Confirmable CoAP
# telemetry from COAP_DEVICES devices, then MQTT QoS 1 from as many
# connections with one message in flight each.
run_coap() {
    local round=$1
    start_ferrite "coap-$round"
    wait_for_quiet_machine
    local coap_args=(coap --addr "127.0.0.1:$COAP_PORT" --tokens-file "$WORK/tokens"
        --devices "$COAP_DEVICES" --duration-s "$COAP_DURATION_S" --label ferrite-coap)
    local mqtt_args=(mqtt --addr "127.0.0.1:$MQTT_PORT" --tokens-file "$WORK/tokens"
        --connections "$COAP_DEVICES" --inflight 1 --duration-s "$COAP_DURATION_S"
        --client-id-prefix "coap-compare" --label ferrite-mqtt-inflight-1)
    COMMANDS=$COAP_COMMANDS note_command "coap" ferrite-bench "${coap_args[@]}"
    COMMANDS=$COAP_COMMANDS note_command "coap mqtt comparison" ferrite-bench "${mqtt_args[@]}"
    timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${coap_args[@]}" >"$WORK/line" ||
        die_with_log "the coap run failed"
    jq -c --argjson round "$round" '. + {round: $round}' "$WORK/line" | tee -a "$COAP_RESULTS" >&2
    wait_for_quiet_machine
    timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${mqtt_args[@]}" >"$WORK/line" ||
        die_with_log "the MQTT comparison run of the coap scenario failed"
    jq -c --argjson round "$round" '. + {round: $round}' "$WORK/line" | tee -a "$COAP_RESULTS" >&2
    stop_server
}

# Prints the median rates and latencies of the coap scenario and the ratio
# of CoAP to MQTT.
summarize_coap() {
    jq -rs '
        def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
        (map(select(.figure == "coap")) ) as $coap
        | (map(select(.figure == "mqtt")) ) as $mqtt
        | ($coap | map(.acks_per_s) | median) as $coap_rate
        | ($mqtt | map(.acks_per_s) | median) as $mqtt_rate
        | "| protocol | acknowledged/s (median) | p50 ms | p99 ms |",
          "|---|---|---|---|",
          "| CoAP CON | \($coap_rate) | \($coap | map(.latency_ms.p50) | median) | \($coap | map(.latency_ms.p99) | median) |",
          "| MQTT QoS 1, 1 in flight | \($mqtt_rate) | \($mqtt | map(.latency_ms.p50) | median) | \($mqtt | map(.latency_ms.p99) | median) |",
          "",
          "CoAP / MQTT rate ratio: \(if ($mqtt_rate // 0) > 0 then ($coap_rate / $mqtt_rate * 100 | round / 100) else "n/a" end)"
    ' "$COAP_RESULTS"
}

# Prints the sum of the samples of Ferrite's metric $1 whose labels match
# the regular expression $2 (all samples when it is empty), from the
# /metrics page saved in file $3.
metric_sum() {
    local name=$1 labels=${2:-} page=$3
    awk -v name="$name" -v labels="$labels" '
        $1 == name || index($1, name "{") == 1 {
            if (labels == "" || $1 ~ labels) { sum += $2 }
        }
        END { printf "%d", sum }
    ' "$page"
}

# Prints the machine's count of UDP datagrams dropped because a socket's
# receive buffer was full (RcvbufErrors in /proc/net/snmp).
udp_receive_buffer_errors() {
    awk '/^Udp:/ { if (header) { print $6; exit } header = 1 }' /proc/net/snmp
}

# Appends a line "unix-time PUSH_DATA-datagrams LoRaWAN-points" from
# Ferrite's /metrics to file $1 about every 0.1 s, at most $2 times.
sample_lorawan_counters() {
    local out=$1 count=$2 now
    for _ in $(seq 1 "$count"); do
        now=$(date +%s.%N)
        curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v now="$now" '
            /^ferrite_lorawan_datagrams_total\{.*type="PUSH_DATA"/ { datagrams += $2 }
            /^ferrite_pipeline_points_total\{.*protocol="lorawan"/ { points += $2 }
            END { printf "%s %d %d\n", now, datagrams, points }
        ' >>"$out" || true
        sleep 0.1
    done
}

# Runs `ferrite-bench lorawan` once against a fresh server at $2 uplinks/s
# and appends its result line, with Ferrite's counters over the run, to
# $LORAWAN_RESULTS. Succeeds when Ferrite kept up with the rate: every
# PUSH_ACK received, every uplink decoded and stored, and the last one
# stored within LORAWAN_MAX_LAG_S seconds after the last datagram.
run_lorawan() {
    local round=$1 rate=$2
    start_ferrite "lorawan-$round-$rate"
    # At least one device per uplink/s, so that each device sends at most
    # one uplink a second. Real class A devices cannot send much faster,
    # because they listen in RX1 and RX2 after each uplink. A device's
    # uplinks closer than the 200 ms deduplication window can be handled
    # out of order, and then the older one is rejected as a replayed frame
    # counter.
    local devices=$((rate > LORAWAN_DEVICES ? rate : LORAWAN_DEVICES))
    # Enough rounds over all devices for LORAWAN_SEND_S seconds of sending.
    local per_device=$(((rate * LORAWAN_SEND_S + devices - 1) / devices))
    local args=(lorawan --http "http://127.0.0.1:$HTTP_PORT" --lorawan "127.0.0.1:$LORAWAN_PORT"
        --api-key-file "$WORK/admin-key" --devices "$devices"
        --uplinks-per-device "$per_device" --rate "$rate"
        --timeout-s $((LORAWAN_SEND_S + LORAWAN_MAX_LAG_S + 30)))
    COMMANDS=$LORAWAN_COMMANDS note_command "lorawan $rate" ferrite-bench "${args[@]}"
    wait_for_quiet_machine

    curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" >"$WORK/metrics-before.txt" ||
        die_with_log "reading Ferrite's /metrics before the lorawan run failed"
    local drops_before
    drops_before=$(udp_receive_buffer_errors)
    # The generator's own elapsed time ends when its sequential reads
    # through the REST API found every device's last uplink, which takes
    # longer the more devices there are. The samples of Ferrite's counters
    # show when the last uplink was stored instead.
    local samples=$WORK/lorawan-samples.txt
    : >"$samples"
    sample_lorawan_counters "$samples" $((GENERATOR_TIMEOUT_S * 10)) &
    local sampler_pid=$!
    STARTED_PIDS+=("$sampler_pid")
    local cpu_before machine_before
    cpu_before=$(cpu_seconds "$SERVER_PID")
    machine_before=$(machine_cpu_seconds)
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" >"$WORK/line" ||
        die_with_log "the lorawan run at $rate uplinks/s failed"
    measure_cpu "$cpu_before" "$machine_before"
    local udp_drops=$(($(udp_receive_buffer_errors) - drops_before))
    # The generator may find the last uplink stored before the sampler
    # records it, so one more sample is taken before the sampler stops.
    # That sample can only make the lag longer than it was.
    sleep 0.5
    kill -TERM "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" >"$WORK/metrics-after.txt" ||
        die_with_log "reading Ferrite's /metrics after the lorawan run failed"

    # The first datagram arrived d / rate seconds before the first sample
    # that counts d datagrams. The last uplink was stored at the latest by
    # the first sample that counts every uplink as a decoded point.
    local timing
    timing=$(awk -v rate="$rate" -v sent="$(jq .uplinks_sent "$WORK/line")" '
        NR == 1 { points_before = $3 }
        $2 > 0 && start == "" { start = $1 - $2 / rate }
        $3 - points_before >= sent && done == "" { done = $1 }
        END {
            if (start == "" || done == "") { print "null null"; exit }
            printf "%.3f %.3f\n", done - start, done - (start + (sent - 1) / rate)
        }
    ' "$samples")
    local store_s lag_s
    read -r store_s lag_s <<<"$timing"

    # Counter increases over the run: uplinks by outcome and decoded points.
    local name labels before after
    local counters=()
    for name in stored overloaded f_cnt_replayed ingest_failed; do
        labels="outcome=\"$name\""
        before=$(metric_sum ferrite_lorawan_uplinks_total "$labels" "$WORK/metrics-before.txt")
        after=$(metric_sum ferrite_lorawan_uplinks_total "$labels" "$WORK/metrics-after.txt")
        counters+=(--argjson "uplinks_$name" $((after - before)))
    done
    before=$(metric_sum ferrite_pipeline_points_total 'protocol="lorawan"' "$WORK/metrics-before.txt")
    after=$(metric_sum ferrite_pipeline_points_total 'protocol="lorawan"' "$WORK/metrics-after.txt")
    counters+=(--argjson points_decoded $((after - before)))

    # store_s runs from the first datagram until the last uplink was
    # stored; lag_s is the part of it after the last datagram was due.
    jq -c "${counters[@]}" --argjson round "$round" --argjson rate "$rate" \
        --argjson max_lag "$LORAWAN_MAX_LAG_S" --argjson server "$SERVER_CPU" \
        --argjson client "$CLIENT_CPU" --argjson other "$OTHER_CPU" \
        --argjson store_s "$store_s" --argjson lag_s "$lag_s" --argjson udp_drops "$udp_drops" '
        . + {figure: "lorawan", round: $round, rate_offered: $rate, udp_receive_buffer_errors: $udp_drops,
             uplinks_per_device: (.uplinks_sent / .devices),
             uplinks_stored: $uplinks_stored, uplinks_overloaded: $uplinks_overloaded,
             uplinks_f_cnt_replayed: $uplinks_f_cnt_replayed,
             uplinks_ingest_failed: $uplinks_ingest_failed, points_decoded: $points_decoded,
             store_s: $store_s, lag_s: $lag_s,
             stored_per_s: (if $store_s then ($points_decoded / $store_s | round) else null end),
             server_cpu_s: $server, client_cpu_s: $client, other_cpu_s: $other}
        | . + {kept_up: (.all_stored and .push_acks == .uplinks_sent
                         and .uplinks_stored == .uplinks_sent and .points_decoded == .uplinks_sent
                         and $lag_s != null and $lag_s <= $max_lag)}
    ' "$WORK/line" | tee -a "$LORAWAN_RESULTS" >&2
    stop_server
    jq -e -s 'last | .kept_up' "$LORAWAN_RESULTS" >/dev/null
}

# The lorawan scenario: ROUNDS rounds over LORAWAN_RATES, each round
# stopping at its first rate that Ferrite did not keep up with.
run_lorawan_scenario() {
    : >"$LORAWAN_RESULTS"
    FERRITE_TEMPLATE="$WORK/ferrite-storage-template"
    local round rate
    for round in $(seq 1 "$ROUNDS"); do
        for rate in $LORAWAN_RATES; do
            log "lorawan round $round: $rate uplinks/s for $LORAWAN_SEND_S s"
            if ! run_lorawan "$round" "$rate"; then
                log "lorawan round $round: Ferrite did not keep up with $rate uplinks/s; skipping higher rates"
                break
            fi
        done
    done
    FERRITE_TEMPLATE="$WORK/ferrite-template"
}

# Repeats one mqtt run of $1 with the same connections split over two
# generator processes. If the summed rate is not higher than with one
# process, the generator was not the bottleneck.
run_mqtt_split() {
    local system=$1
    "start_$system" split
    wait_for_quiet_machine
    local half=$((MQTT_CONNECTIONS / 2))
    head -n "$half" "$WORK/tokens" >"$WORK/tokens-a"
    tail -n +"$((half + 1))" "$WORK/tokens" >"$WORK/tokens-b"
    local part pids=()
    for part in a b; do
        local count=$half
        [[ $part == b ]] && count=$((MQTT_CONNECTIONS - half))
        local args=(mqtt --addr "127.0.0.1:$MQTT_PORT" --tokens-file "$WORK/tokens-$part"
            --connections "$count" --inflight "$MQTT_INFLIGHT" --duration-s "$MQTT_DURATION_S"
            --client-id-prefix "bench-pub-$part" --label "$system")
        note_command "mqtt split $system" ferrite-bench "${args[@]}"
        timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" >"$WORK/split-$part.json" &
        pids+=("$!")
        STARTED_PIDS+=("$!")
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || die_with_log "a split mqtt generator failed against $system"
    done
    jq -s -c --arg system "$system" \
        '{figure: "mqtt_split", system: $system, generator_processes: 2,
          connected: (map(.connected) | add), acks_per_s: (map(.acks_per_s) | add),
          first_error: (map(.first_error | select(. != null)) | first)}' \
        "$WORK/split-a.json" "$WORK/split-b.json" | tee -a "$RESULTS" >&2
    stop_server
}

# Opens $IDLE_CONNECTIONS idle connections to a fresh instance of $1 and
# records the server's VmRSS before and after. The connections are split over
# several generator processes when the open-files limit is too low for one.
run_memory() {
    local system=$1
    "start_$system" 1
    sleep 2
    local before
    before=$(rss_kib "$SERVER_PID")

    local hard per_process processes
    hard=$(ulimit -Hn)
    per_process=$((hard - 256))
    processes=$(((IDLE_CONNECTIONS + per_process - 1) / per_process))
    local share=$(((IDLE_CONNECTIONS + processes - 1) / processes))
    local pids=() index
    for index in $(seq 0 $((processes - 1))); do
        local count=$share
        ((index == processes - 1)) && count=$((IDLE_CONNECTIONS - share * (processes - 1)))
        local args=(idle --addr "127.0.0.1:$MQTT_PORT" --tokens-file "$WORK/tokens" --count "$count"
            --keep-alive-s 60 --hold-s $((IDLE_SETTLE_S + 20)) --client-id-prefix "idle-$index"
            --ready-file "$WORK/ready-$index" --label "$system")
        note_command "idle $system" ferrite-bench "${args[@]}"
        rm -f "$WORK/ready-$index"
        timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" >"$WORK/idle-$index.json" &
        pids+=("$!")
        STARTED_PIDS+=("$!")
    done

    for index in $(seq 0 $((processes - 1))); do
        for _ in $(seq 1 1800); do
            [[ -f "$WORK/ready-$index" ]] && break
            sleep 0.1
        done
        [[ -f "$WORK/ready-$index" ]] || die "idle generator $index did not open its connections within 180 s"
    done
    sleep "$IDLE_SETTLE_S"
    local after
    after=$(rss_kib "$SERVER_PID")
    local server_count=null
    if [[ $system == ferrite ]]; then
        server_count=$(curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" | awk '/^ferrite_mqtt_connections / { print $2 }')
    fi
    for pid in "${pids[@]}"; do
        wait "$pid" || die "an idle generator failed against $system"
    done

    local connected
    connected=$(cat "$WORK"/idle-*.json | jq -s 'map(.connected) | add')
    jq -n -c --arg system "$system" --argjson before "$before" --argjson after "$after" \
        --argjson connected "$connected" --argjson count "$IDLE_CONNECTIONS" \
        --argjson server_count "${server_count:-null}" --argjson processes "$processes" \
        --slurpfile generators <(cat "$WORK"/idle-*.json) \
        '{figure: "memory", system: $system, count: $count, connected: $connected,
          connections_reported_by_server: $server_count, generator_processes: $processes,
          connect_s: ([$generators[].connect_s] | max),
          rss_before_mib: ($before / 1024 * 10 | round / 10), rss_after_mib: ($after / 1024 * 10 | round / 10),
          kib_per_connection: (($after - $before) / $connected * 100 | round / 100),
          first_error: ([$generators[].first_error | select(. != null)] | first)}' |
        tee -a "$RESULTS" >&2
    rm -f "$WORK"/idle-*.json
    stop_server
}

# Counts the `readings` lines stored in the running instance of $1 (one
# latitude value per line).
count_stored_lines() {
    local system=$1
    case $system in
        ferrite)
            local key ids total=0 id count
            key=$(cat "$WORK/api-key")
            ids=$(curl -fs -H "Authorization: Bearer $key" "http://127.0.0.1:$HTTP_PORT/api/v1/devices?limit=1000" |
                jq -r '.devices[] | select(.name | startswith("truck_")) | .id')
            for id in $ids; do
                count=$(curl -fs -H "Authorization: Bearer $key" \
                    "http://127.0.0.1:$HTTP_PORT/api/v1/devices/$id/telemetry?keys=readings.latitude&limit=10000" |
                    jq '."readings.latitude" | length')
                total=$((total + count))
            done
            echo "$total"
            ;;
        influxdb)
            curl -fs "http://127.0.0.1:$HTTP_PORT/query?db=bench" --data-urlencode "q=SELECT count(latitude) FROM readings" |
                jq '.results[0].series[0].values[0][1] // 0'
            ;;
        victoriametrics)
            curl -fs -o /dev/null "http://127.0.0.1:$HTTP_PORT/internal/force_flush"
            sleep 1
            curl -fs "http://127.0.0.1:$HTTP_PORT/api/v1/query" \
                --data-urlencode 'query=sum(count_over_time(readings_latitude[1d]))' |
                jq '(.data.result[0].value[1] // "0") | tonumber'
            ;;
    esac
}

# Sends one acknowledged batch to a fresh instance of $1, kills the server
# with SIGKILL right after the acknowledgement, restarts it on the same data
# directory and counts the lines that survived.
check_durability() {
    local system=$1
    "start_$system" durability
    local args=(lp --url "$(lp_url "$system")" --connections 1 --batch-lines "$LP_BATCH_LINES"
        --batches 1 --warmup-batches 0 --devices 100 --start-s $(($(date +%s) - 3600)) --label "$system")
    [[ $system == ferrite ]] && args+=(--token "$(cat "$WORK/api-key")")
    timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" >"$WORK/line" ||
        die_with_log "the durability batch against $system failed"
    kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true

    "start_$system" durability reuse
    local acknowledged found
    acknowledged=$(jq .lines "$WORK/line")
    found=$(count_stored_lines "$system")
    jq -n -c --arg system "$system" --argjson acknowledged "$acknowledged" --argjson found "${found:-0}" \
        '{figure: "durability", system: $system, lines_acknowledged: $acknowledged, lines_after_sigkill: $found}' |
        tee -a "$RESULTS" >&2
    stop_server
    rm -rf "$WORK/run"
}

# Prints the sample rows of the profile, without comments and blank lines.
perf_rows() {
    perf report -i "$WORK/perf.data" --no-children --stdio -g none "$@" 2>/dev/null |
        awk '/^ +[0-9.]+%/' || true
}

# Sums the self-time shares of `--sort dso,symbol` rows into kinds of work.
group_samples() {
    awk '
        { share = $1; sub("%", "", share) }
        /libc[.]so.* (malloc|_int_malloc|_int_free|free|cfree|realloc|_int_realloc|malloc_consolidate|unlink_chunk|tcache)/ { kind["memory allocator (malloc, free, realloc)"] += share; next }
        / _?mi_[a-z_]+/ { kind["memory allocator (malloc, free, realloc)"] += share; next }
        /ferrite_codec::line_protocol/ { kind["line-protocol parsing (ferrite_codec::line_protocol)"] += share; next }
        /ferrite_tsdb::/ { kind["time-series store (ferrite_tsdb)"] += share; next }
        /\[kernel/ { kind["kernel (syscalls, network, disk, scheduling)"] += share; next }
        /sip::Hasher|hashbrown/ { kind["hashing and hash maps"] += share; next }
        /mem(cmp|move|cpy|set)|bcmp/ { kind["memory copies and compares"] += share; next }
        /sqlite|sqlx/ { kind["metadata database (SQLite, sqlx)"] += share; next }
        { kind["other"] += share }
        END { for (name in kind) printf "%6.1f%%  %s\n", kind[name], name }
    ' | sort -rn
}

# One more Ferrite lp run, sampled by perf, plus Ferrite's own counters.
profile_ferrite_lp() {
    local out=$WORK/profile.md
    start_ferrite profile
    wait_for_quiet_machine
    local args=(lp --url "$(lp_url ferrite)" --connections "$LP_CONNECTIONS"
        --batch-lines "$LP_BATCH_LINES" --batches "$LP_BATCHES" --devices "$LP_DEVICES"
        --max-duration-s "$LP_MAX_DURATION_S" --start-s "$LP_START_S" --label ferrite-profiled
        --token "$(cat "$WORK/api-key")")
    perf record -F 499 -p "$SERVER_PID" -o "$WORK/perf.data" >/dev/null 2>"$WORK/logs/perf.log" &
    local perf_pid=$!
    STARTED_PIDS+=("$perf_pid")
    sleep 1
    local cpu_before machine_before
    cpu_before=$(cpu_seconds "$SERVER_PID")
    machine_before=$(machine_cpu_seconds)
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" >"$WORK/line" ||
        die_with_log "the profiled lp run failed"
    measure_cpu "$cpu_before" "$machine_before"
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    local expected
    expected=$(jq '(.batches_ok + .warmup_batches) * .batch_lines * .fields_per_line' "$WORK/line")
    stored_points ferrite "$expected" >/dev/null
    curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" >"$WORK/ferrite-metrics.txt"
    stop_server

    {
        echo "Profiled run: \`$(jq -c '{points_per_s, points_per_s_by_half, elapsed_s, latency_ms}' "$WORK/line")\`,"
        echo "with $SERVER_CPU CPU s in Ferrite, $CLIENT_CPU in the generator and $OTHER_CPU in other processes"
        echo "(perf included). The samples come from \`perf record -F 499 -p PID\` over the whole run."
        echo
        echo "CPU samples per thread (\`perf report --sort comm\`):"
        echo
        echo '```text'
        perf_rows --sort comm | awk 'NR <= 12'
        echo '```'
        echo
        echo "CPU samples by kind of work (self time of each function, summed by name pattern):"
        echo
        echo '```text'
        perf_rows --sort dso,symbol | group_samples
        echo '```'
        echo
        echo "Hottest functions, self time (\`perf report --no-children --sort comm,dso,symbol\`, top 30):"
        echo
        echo '```text'
        perf_rows --sort comm,dso,symbol | awk 'NR <= 30 { print substr($0, 1, 150) }'
        echo '```'
        echo
        echo "Ferrite's counters after the profiled run:"
        echo
        echo '```text'
        grep -E '^ferrite_(ingest_log|pipeline|store|ingest_messages|ingest_overloaded)[a-z_]*(\{[^}]*\})? ' \
            "$WORK/ferrite-metrics.txt" || true
        echo '```'
    } >"$out"
}

# ---------------------------------------------------------------- storage ---

# Prints those of the arguments that $SYSTEMS names, in the order given.
selected() {
    local system
    for system in "$@"; do
        if [[ " $SYSTEMS " == *" $system "* ]]; then
            echo "$system"
        fi
    done
}

# Succeeds when $SCENARIOS names $1.
scenario_enabled() {
    [[ " $SCENARIOS " == *" $1 "* ]]
}

# Writes the fleet dataset to $DATASET and records the generator's counts
# and speed as a "generate" line.
generate_dataset() {
    local args=(generate "${DATASET_ARGS[@]}" --output "$DATASET")
    COMMANDS=$STORAGE_COMMANDS note_command generate ferrite-bench "${args[@]}"
    "$BENCH" "${args[@]}" 2>"$WORK/generate.json" ||
        die "the dataset generator failed: $(cat "$WORK/generate.json")"
    tee -a "$STORAGE_RESULTS" <"$WORK/generate.json" >&2
}

# Records the result sizes computed from the generator, which every
# system's query results are compared with.
record_expected_results() {
    local args=(queries --system expected "${DATASET_ARGS[@]}")
    COMMANDS=$STORAGE_COMMANDS note_command "queries expected" ferrite-bench "${args[@]}"
    "$BENCH" "${args[@]}" >"$WORK/expected.json" || die "computing the expected query results failed"
    cat "$WORK/expected.json" >>"$STORAGE_RESULTS"
}

# Sends $DATASET once to the running server (or sink) named $1 at URL $2 and
# appends the lp_dataset line of round $3, with CPU use and the field values
# the server reports, to $STORAGE_RESULTS.
ingest_dataset() {
    local system=$1 url=$2 round=$3
    local args=(lp --url "$url" --dataset "$DATASET" --batch-lines "$STORAGE_BATCH_LINES"
        --connections "$STORAGE_CONNECTIONS" --max-duration-s "$STORAGE_MAX_DURATION_S" --label "$system")
    local token=()
    if [[ $system == ferrite ]]; then
        token=(--token "$(cat "$WORK/admin-key")")
        # The key is written as the literal text $API_KEY on purpose.
        # shellcheck disable=SC2016
        COMMANDS=$STORAGE_COMMANDS note_command "lp --dataset $system" ferrite-bench "${args[@]}" --token '$API_KEY'
    else
        COMMANDS=$STORAGE_COMMANDS note_command "lp --dataset $system" ferrite-bench "${args[@]}"
    fi

    wait_for_quiet_machine
    local cpu_before machine_before
    cpu_before=$(cpu_seconds "$SERVER_PID")
    machine_before=$(machine_cpu_seconds)
    # Reading and splitting the file before the clock starts takes time too.
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" \
        timeout "$((STORAGE_MAX_DURATION_S + 300))" "$BENCH" "${args[@]}" "${token[@]}" >"$WORK/line" ||
        die_with_log "loading the dataset into $system failed"
    measure_cpu "$cpu_before" "$machine_before"

    local sent stored
    sent=$(jq .points "$WORK/line")
    stored=$(stored_field_values "$system" "$sent")
    jq -c --argjson server "$SERVER_CPU" --argjson client "$CLIENT_CPU" --argjson other "$OTHER_CPU" \
        --argjson round "$round" --argjson stored "${stored:-null}" \
        '. + {round: $round, server_cpu_s: $server, client_cpu_s: $client, other_cpu_s: $other,
              field_values_reported_by_server: $stored}' \
        "$WORK/line" | tee -a "$STORAGE_RESULTS" >&2
    jq -e '.batches_failed == 0 and .batches_ok == .batches_total' "$WORK/line" >/dev/null ||
        log "warning: $system did not acknowledge every batch of the dataset; see first_error"
}

# Prints the field values the running server $1 stores or reports as written
# (null for the sink). Ferrite's pipeline counter trails the
# acknowledgements, so it is polled until it reaches $2 or 60 s pass.
stored_field_values() {
    local system=$1 sent=$2
    case $system in
        ferrite)
            stored_points ferrite "$sent" | awk '{ print $1 }'
            ;;
        influxdb)
            curl -fs "http://127.0.0.1:$HTTP_PORT/query?db=bench" \
                --data-urlencode 'q=SELECT count(*) FROM "readings", "diagnostics"' |
                jq '[.results[0].series[]?.values[0][1:][] | numbers] | add // 0'
            ;;
        victoriametrics)
            curl -fs -o /dev/null "http://127.0.0.1:$HTTP_PORT/internal/force_flush"
            stored_points victoriametrics "$sent" | awk '{ print $1 }'
            ;;
        *)
            echo null
            ;;
    esac
}

# Sends the dataset to `ferrite-bench sink`, which discards it: the rate the
# generator reaches with no storage behind the socket.
run_sink_ingest() {
    rm -f "$WORK/sink-port"
    "$BENCH" sink --port-file "$WORK/sink-port" --duration-s "$((STORAGE_MAX_DURATION_S + 600))" \
        >/dev/null 2>>"$WORK/logs/sink.log" &
    SERVER_PID=$!
    SERVER_LOG="$WORK/logs/sink.log"
    STARTED_PIDS+=("$SERVER_PID")
    for _ in $(seq 1 100); do
        [[ -s "$WORK/sink-port" ]] && break
        sleep 0.1
    done
    [[ -s "$WORK/sink-port" ]] || die_with_log "the sink did not write its port within 10 s"
    HTTP_PORT=$(cat "$WORK/sink-port")
    ingest_dataset null-sink "http://127.0.0.1:$HTTP_PORT/write?precision=ns" 1
    stop_server
}

# Each compact_<system> NAME makes the running server of the data directory
# NAME compact its data and sets COMPACTION to the method used.

# Ferrite compacts when asked through the admin API. Without that endpoint,
# stopping it with SIGTERM and starting it on the same directory compacts it.
# NOTE: neither path has run yet, because both were written before Ferrite
# had them.
compact_ferrite() {
    local name=$1 code
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST \
        -H "Authorization: Bearer $(cat "$WORK/admin-key")" \
        "http://127.0.0.1:$HTTP_PORT/api/v1/admin/compact" || true)
    if [[ $code == 2?? ]]; then
        COMPACTION="POST /api/v1/admin/compact (HTTP $code)"
        return
    fi
    stop_server "$COMPACT_TIMEOUT_S"
    start_ferrite "$name" reuse
    COMPACTION="SIGTERM and restart (POST /api/v1/admin/compact returned HTTP $code)"
}

# InfluxDB was started with short cold-write durations, so it writes its
# cache to TSM files and compacts them fully on its own once writes stop.
compact_influxdb() {
    COMPACTION="cache-snapshot-write-cold-duration = 5s, compact-full-write-cold-duration = 10s; waited until idle"
}

compact_victoriametrics() {
    curl -fs -o /dev/null "http://127.0.0.1:$HTTP_PORT/internal/force_flush"
    curl -fs -o /dev/null "http://127.0.0.1:$HTTP_PORT/internal/force_merge"
    COMPACTION="/internal/force_flush, /internal/force_merge; waited until no merge was active"
}

# Succeeds while the running server $1 reports compaction or merge work.
server_busy() {
    case $1 in
        influxdb)
            local wal active
            wal=$(find "$2/wal" -name '*.wal' -size +0c | wc -l)
            active=$(curl -fs "http://127.0.0.1:$HTTP_PORT/debug/vars" |
                jq '[to_entries[] | select(.key | startswith("tsm1_engine")) | .value.values
                     | to_entries[] | select(.key | endswith("CompactionsActive")) | .value] | add // 0')
            ((wal > 0 || active > 0))
            ;;
        victoriametrics)
            curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" |
                awk '/^vm_active_(force_)?merges/ || /^vm_pending_rows/ { busy += $2 } END { exit !(busy > 0) }'
            ;;
        *)
            return 1
            ;;
    esac
}

# Prints the data directories of system $1 whose data directory is $2.
data_paths() {
    case $1 in
        influxdb) echo "$2/meta" "$2/data" "$2/wal" ;;
        *) echo "$2" ;;
    esac
}

# Waits until the server $1 with data directory $2 reports no background
# work and its directory size has not changed for three checks 2 s apart,
# after at least $3 seconds, or until $COMPACT_TIMEOUT_S seconds pass.
wait_until_settled() {
    local system=$1 dir=$2 minimum=$3 waited=0 previous="" same=0 size
    local paths
    read -r -a paths <<<"$(data_paths "$system" "$dir")"
    while ((waited < COMPACT_TIMEOUT_S)); do
        sleep 2
        waited=$((waited + 2))
        size=$(du -s -b -c "${paths[@]}" | tail -n 1 | cut -f 1)
        if [[ $size == "$previous" ]] && ! server_busy "$system" "$dir"; then
            same=$((same + 1))
        else
            same=0
        fi
        previous=$size
        ((same >= 3 && waited >= minimum)) && return 0
    done
    log "warning: $system was still busy or growing after $COMPACT_TIMEOUT_S s; measuring anyway"
}

# Runs the query set against the running server $1 and appends its line of
# round $2, with the queries whose result sizes differ from the expected ones.
run_queries() {
    local system=$1 round=$2
    local args=(queries --system "$system" --url "http://127.0.0.1:$HTTP_PORT" "${DATASET_ARGS[@]}"
        --rounds "$QUERY_ROUNDS")
    [[ $system == influxdb ]] && args+=(--db bench)
    local token=()
    if [[ $system == ferrite ]]; then
        token=(--token "$(cat "$WORK/admin-key")")
        # shellcheck disable=SC2016
        COMMANDS=$STORAGE_COMMANDS note_command "queries $system" ferrite-bench "${args[@]}" --token '$API_KEY'
    else
        COMMANDS=$STORAGE_COMMANDS note_command "queries $system" ferrite-bench "${args[@]}"
    fi
    wait_for_quiet_machine
    timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" "${token[@]}" >"$WORK/line" ||
        die_with_log "the query set against $system failed"
    jq -c --argjson round "$round" --slurpfile expected "$WORK/expected.json" \
        '. + {round: $round, rows_differ_from_expected:
              [.queries | to_entries[] | select(.value.rows != $expected[0].queries[.key].rows) | .key]}' \
        "$WORK/line" | tee -a "$STORAGE_RESULTS" >&2
    local differing
    differing=$(tail -n 1 "$STORAGE_RESULTS" | jq -r '.rows_differ_from_expected | join(", ")')
    [[ -z "$differing" ]] || log "warning: $system returned other result sizes than expected for: $differing"
}

# One load of the dataset into a fresh instance of $1: ingest, memory,
# compaction, bytes on disk, queries.
run_storage() {
    local system=$1 round=$2
    local name="storage-$round"
    local dir="$WORK/run/$system-$name"
    "start_$system" "$name"
    ingest_dataset "$system" "$(lp_url "$system")" "$round"
    local points rss_ingest
    points=$(jq .points "$WORK/line")
    rss_ingest=$(rss_kib "$SERVER_PID")

    local started minimum=0
    started=$(date +%s.%N)
    "compact_$system" "$name"
    # InfluxDB starts its full compaction 10 s after the last write. The
    # margin covers the delay until it starts, under 5 s with InfluxDB 1.6.7.
    [[ $system == influxdb ]] && minimum=30
    wait_until_settled "$system" "$dir" "$minimum"
    local compaction_s
    compaction_s=$(awk -v started="$started" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - started }')

    local paths disk apparent rss_compacted
    read -r -a paths <<<"$(data_paths "$system" "$dir")"
    disk=$(du -s -B1 -c "${paths[@]}" | tail -n 1 | cut -f 1)
    apparent=$(du -s -b -c "${paths[@]}" | tail -n 1 | cut -f 1)
    rss_compacted=$(rss_kib "$SERVER_PID")

    run_queries "$system" "$round"
    local rss_queries
    rss_queries=$(rss_kib "$SERVER_PID")

    jq -n -c --arg system "$system" --argjson round "$round" --argjson points "$points" \
        --argjson disk "$disk" --argjson apparent "$apparent" --arg compaction "$COMPACTION" \
        --argjson compaction_s "$compaction_s" --argjson rss_ingest "$rss_ingest" \
        --argjson rss_compacted "$rss_compacted" --argjson rss_queries "$rss_queries" \
        '{figure: "storage", system: $system, round: $round, field_values: $points,
          disk_bytes: $disk, apparent_bytes: $apparent,
          bytes_per_value: (if $points > 0 then ($disk / $points * 1000 | round / 1000) else null end),
          apparent_bytes_per_value: (if $points > 0 then ($apparent / $points * 1000 | round / 1000) else null end),
          disk_mib: ($disk / 1048576 * 10 | round / 10),
          rss_after_ingest_mib: ($rss_ingest / 1024 * 10 | round / 10),
          rss_after_compaction_mib: ($rss_compacted / 1024 * 10 | round / 10),
          rss_after_queries_mib: ($rss_queries / 1024 * 10 | round / 10),
          compaction: $compaction, compaction_s: $compaction_s}' | tee -a "$STORAGE_RESULTS" >&2
    stop_server "$COMPACT_TIMEOUT_S"
    rm -rf "$WORK/run"
}

# The storage scenario: the dataset once, the sink run, then ROUNDS loads of
# every selected system, the order rotated by one system each round.
run_storage_scenario() {
    local systems
    mapfile -t systems < <(selected ferrite influxdb victoriametrics)
    ((${#systems[@]} > 0)) || { log "storage: no system selected"; return 0; }

    log "storage: generating the dataset ($STORAGE_DEVICES trucks, $STORAGE_DURATION)"
    generate_dataset
    record_expected_results
    log "storage: the dataset sent to a sink that discards it"
    run_sink_ingest

    # Short cold-write durations make InfluxDB compact soon after the load.
    INFLUXDB_DATA_SETTINGS='  cache-snapshot-write-cold-duration = "5s"
  compact-full-write-cold-duration = "10s"'
    FERRITE_TEMPLATE="$WORK/ferrite-storage-template"
    # A restart on a loaded data directory may take longer than an empty start.
    START_WAIT_S=$COMPACT_TIMEOUT_S
    local round index count=${#systems[@]}
    for round in $(seq 1 "$ROUNDS"); do
        for index in $(seq 0 $((count - 1))); do
            local system=${systems[$(((index + round - 1) % count))]}
            log "storage round $round: $system"
            run_storage "$system" "$round"
        done
    done
    INFLUXDB_DATA_SETTINGS=""
    FERRITE_TEMPLATE="$WORK/ferrite-template"
    START_WAIT_S=30
    write_storage_results_page
}

# ---------------------------------------------------------------- series ---

# Prints the series that the running server $1 reports, or null. For
# VictoriaMetrics these are the entries of its cache from series name to id.
# Its index may count a few percent more, because concurrent first writes of
# a series may register it twice: with 1.79.5, `/api/v1/series/count` gave
# 14,840 for 14,000 series. For InfluxDB they are the series of the database
# times the 7 fields, because InfluxDB counts one series per tag set. For
# Ferrite it is the store's series gauge, refreshed every 10 s.
reported_series() {
    case $1 in
        ferrite)
            curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" |
                awk '/^ferrite_store_series / { print $2; found = 1 } END { if (!found) print "null" }'
            ;;
        influxdb)
            curl -fs "http://127.0.0.1:$HTTP_PORT/debug/vars" |
                jq '."database:bench".values.numSeries // null | if . == null then null else . * 7 end'
            ;;
        victoriametrics)
            curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" |
                awk '/^vm_cache_entries\{type="storage\/tsid"\}/ { print $2 }'
            ;;
        *)
            echo null
            ;;
    esac
}

# Sends the series load to a fresh instance of $1 and appends its "series"
# line: the lp result with VmRSS right after the last acknowledgement, VmRSS
# after $SERIES_SETTLE_S seconds without load, VmHWM and CPU use.
run_series() {
    local system=$1
    "start_$system" series
    local args=(lp --url "$(lp_url "$system")" --connections "$LP_CONNECTIONS"
        --batch-lines "$SERIES_BATCH_LINES" --batches "$SERIES_BATCHES" --warmup-batches 0
        --devices "$SERIES_DEVICES" --start-s "$SERIES_START_S"
        --max-duration-s "$SERIES_MAX_DURATION_S" --label "$system")
    local token=()
    if [[ $system == ferrite ]]; then
        token=(--token "$(cat "$WORK/admin-key")")
        # The key is written as the literal text $API_KEY on purpose.
        # shellcheck disable=SC2016
        COMMANDS=$SERIES_COMMANDS note_command "lp $system" ferrite-bench "${args[@]}" --token '$API_KEY'
    else
        COMMANDS=$SERIES_COMMANDS note_command "lp $system" ferrite-bench "${args[@]}"
    fi

    wait_for_quiet_machine
    local cpu_before machine_before rss_load
    cpu_before=$(cpu_seconds "$SERVER_PID")
    machine_before=$(machine_cpu_seconds)
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" "${token[@]}" >"$WORK/line" ||
        die_with_log "the series load against $system failed"
    rss_load=$(rss_kib "$SERVER_PID")
    measure_cpu "$cpu_before" "$machine_before"
    jq -e '.batches_failed == 0 and .batches_ok == .batches_total' "$WORK/line" >/dev/null ||
        log "warning: $system did not acknowledge every batch: some failed or were not sent within SERIES_MAX_DURATION_S=$SERIES_MAX_DURATION_S s; see first_error"

    # Nothing is sent during the wait, so background work (flushes, merges,
    # cache trimming) shows in the second reading.
    sleep "$SERIES_SETTLE_S"
    local rss_settled hwm
    rss_settled=$(rss_kib "$SERVER_PID")
    hwm=$(hwm_kib "$SERVER_PID")

    local sent stored series budget=null budget_bytes=null
    sent=$(jq .points "$WORK/line")
    read -r stored _ < <(stored_points "$system" "$sent")
    series=$(reported_series "$system")
    if [[ $system == ferrite && -n "$SERIES_MEMORY_BUDGET" ]]; then
        budget=$(jq -n --arg budget "$SERIES_MEMORY_BUDGET" '$budget')
        budget_bytes=$SERIES_MEMORY_BUDGET_BYTES
    fi
    jq -c --argjson server "$SERVER_CPU" --argjson client "$CLIENT_CPU" --argjson other "$OTHER_CPU" \
        --argjson series_sent "$((SERIES_DEVICES * 7))" --argjson rounds "$SERIES_ROUNDS" \
        --argjson series "${series:-null}" --argjson stored "${stored:-null}" \
        --argjson rss_load "$rss_load" --argjson rss_settled "$rss_settled" --argjson hwm "$hwm" \
        --argjson settle_s "$SERIES_SETTLE_S" --argjson budget "$budget" --argjson budget_bytes "$budget_bytes" \
        '. + {figure: "series", series_sent: $series_sent, points_per_series: $rounds,
              series_reported_by_server: $series, field_values_reported_by_server: $stored,
              rss_after_load_mib: ($rss_load / 1024 * 10 | round / 10),
              rss_settled_mib: ($rss_settled / 1024 * 10 | round / 10),
              rss_peak_mib: ($hwm / 1024 * 10 | round / 10),
              settle_s: $settle_s, memory_budget: $budget, memory_budget_bytes: $budget_bytes,
              server_cpu_s: $server, client_cpu_s: $client, other_cpu_s: $other}' \
        "$WORK/line" | tee -a "$SERIES_RESULTS" >&2
    # With a million series in memory, a server may need more than the
    # default 30 s to write them out at SIGTERM.
    stop_server 60
    rm -rf "$WORK/run"
}

# Prints the bytes of a size such as 1073741824, 512MiB or 1GiB (suffixes
# KiB, MiB and GiB, powers of 1024), or stops the script on another form.
byte_count() {
    local size=$1
    [[ $size =~ ^([0-9]+)(KiB|MiB|GiB)?$ ]] ||
        die "invalid byte size \"$size\": write bytes, or a number with KiB, MiB or GiB such as 1GiB"
    # 10# reads a number with leading zeros as decimal, not octal.
    local number=$((10#${BASH_REMATCH[1]}))
    case ${BASH_REMATCH[2]} in
        KiB) echo $((number * 1024)) ;;
        MiB) echo $((number * 1024 * 1024)) ;;
        GiB) echo $((number * 1024 * 1024 * 1024)) ;;
        *) echo "$number" ;;
    esac
}

# The series scenario: one load of every selected system, each on a fresh
# instance.
run_series_scenario() {
    local systems
    mapfile -t systems < <(selected ferrite influxdb victoriametrics)
    ((${#systems[@]} > 0)) || { log "series: no system selected"; return 0; }
    ((SERIES_MAX_DURATION_S > 0)) ||
        die "SERIES_MAX_DURATION_S is $SERIES_MAX_DURATION_S; set it to at least 1 or GENERATOR_TIMEOUT_S above 90"

    # Batches of equal size, at most LP_BATCH_LINES lines, that give every
    # series SERIES_ROUNDS points. Lines go round-robin over the trucks, so
    # the lines that rounding up adds, fewer than one per batch, give the
    # first trucks one point more.
    local lines=$((SERIES_DEVICES * SERIES_ROUNDS))
    SERIES_BATCHES=$(((lines + LP_BATCH_LINES - 1) / LP_BATCH_LINES))
    SERIES_BATCH_LINES=$(((lines + SERIES_BATCHES - 1) / SERIES_BATCHES))
    # 00:00 UTC yesterday. A truck's points are 10 s apart, so with fewer
    # than 8,640 rounds they stay within one day, one of Ferrite's partitions.
    SERIES_START_S=$((($(date +%s) / 86400 - 1) * 86400))

    FERRITE_TEMPLATE="$WORK/ferrite-storage-template"
    if [[ -n "$SERIES_MEMORY_BUDGET" ]]; then
        # A plain assignment, so that set -e stops the script on an invalid size.
        SERIES_MEMORY_BUDGET_BYTES=$(byte_count "$SERIES_MEMORY_BUDGET")
        FERRITE_CONFIG_FILE="$WORK/ferrite-series.toml"
        printf '[storage]\nmemory_budget_bytes = %s\n' "$SERIES_MEMORY_BUDGET_BYTES" >"$FERRITE_CONFIG_FILE"
    fi
    # By default InfluxDB 1.6 rejects the points of a tag's 100,001st value
    # (the tag `name` has one per truck) and of a database's 1,000,001st
    # series (one per tag set, so per truck). Both limits are switched off.
    INFLUXDB_DATA_SETTINGS='  max-values-per-tag = 0
  max-series-per-database = 0'
    local system
    for system in "${systems[@]}"; do
        log "series: $system, $((SERIES_DEVICES * 7)) series with $SERIES_ROUNDS points each"
        run_series "$system"
    done
    INFLUXDB_DATA_SETTINGS=""
    FERRITE_CONFIG_FILE=""
    FERRITE_TEMPLATE="$WORK/ferrite-template"
    write_series_results_page
}

# One live run on a fresh Ferrite: MQTT publishers at a fixed rate and one
# WebSocket subscriber that measures the latency.
run_live() {
    local round=$1
    start_ferrite "live-$round"
    wait_for_quiet_machine
    local args=(live --http-addr "127.0.0.1:$HTTP_PORT" --mqtt-addr "127.0.0.1:$MQTT_PORT"
        --api-key-file "$WORK/api-key" --tokens-file "$WORK/tokens"
        --devices "$LIVE_DEVICES" --rate "$LIVE_RATE" --duration-s "$LIVE_DURATION_S")
    grep -q . "$LIVE_COMMANDS" 2>/dev/null || echo "ferrite-bench ${args[*]//$WORK/\$WORK}" >"$LIVE_COMMANDS"

    local cpu_before machine_before
    cpu_before=$(cpu_seconds "$SERVER_PID")
    machine_before=$(machine_cpu_seconds)
    /usr/bin/time -f '%U %S %M' -o "$WORK/time" timeout "$GENERATOR_TIMEOUT_S" "$BENCH" "${args[@]}" >"$WORK/line" ||
        die_with_log "the live run failed"
    measure_cpu "$cpu_before" "$machine_before"
    jq -c --argjson server "$SERVER_CPU" --argjson client "$CLIENT_CPU" --argjson other "$OTHER_CPU" \
        --argjson round "$round" \
        '. + {round: $round, server_cpu_s: $server, client_cpu_s: $client, other_cpu_s: $other}' \
        "$WORK/line" | tee -a "$LIVE_RESULTS" >&2
    stop_server
}

# ---------------------------------------------------------------- report ---

write_results_page() {
    local block=$WORK/results-block.md
    {
        echo "<!-- results:start (generated by bench/run.sh; edits here are overwritten) -->"
        echo
        echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$(git -C "$REPO" rev-parse --short HEAD)\`$(git -C "$REPO" diff --quiet HEAD -- crates/ferrite || echo ' with uncommitted changes in crates/ferrite')."
        echo
        echo "Machine: $(nproc) CPUs, $(lscpu | awk -F': *' '/^Model name/ { print $2; exit }'); memory (\`free -g\`):"
        echo
        echo '```text'
        free -g
        echo '```'
        echo
        echo "Versions: $(ferrite_version); InfluxDB $(dpkg-query -W -f='${Version}' influxdb);"
        echo "VictoriaMetrics $(dpkg-query -W -f='${Version}' victoria-metrics); Mosquitto $(dpkg-query -W -f='${Version}' mosquitto) (Debian package versions)."
        echo
        echo "Settings: ROUNDS=$ROUNDS, LP_CONNECTIONS=$LP_CONNECTIONS, LP_BATCH_LINES=$LP_BATCH_LINES,"
        echo "LP_BATCHES=$LP_BATCHES, LP_DEVICES=$LP_DEVICES, MQTT_CONNECTIONS=$MQTT_CONNECTIONS,"
        echo "MQTT_INFLIGHT=$MQTT_INFLIGHT, MQTT_DURATION_S=$MQTT_DURATION_S, MQTT_DEVICES=$MQTT_DEVICES,"
        echo "IDLE_CONNECTIONS=$IDLE_CONNECTIONS, IDLE_SETTLE_S=$IDLE_SETTLE_S."
        echo
        "$BENCH" summary --results "$RESULTS" --reference ferrite
        echo "Generator commands (one per system; every run of a system used the same):"
        echo
        echo '```text'
        cat "$COMMANDS"
        echo '```'
        echo
        echo "#### Where Ferrite's time goes during line-protocol ingest"
        echo
        cat "$WORK/profile.md"
        echo
        echo "<details><summary>Raw result lines</summary>"
        echo
        echo '```json'
        cat "$RESULTS"
        echo '```'
        echo
        echo "</details>"
        echo
        echo "<!-- results:end -->"
    } >"$block"
    replace_block results "$block" fail
}

ferrite_version() {
    if [[ -x "$FERRITE" ]]; then
        "$FERRITE" --version
    else
        echo "ferrite (not built in this run)"
    fi
}

# Replaces the lines from `<!-- $1:start` to `<!-- $1:end -->` of the results
# page with the file $2. A page without the markers makes the script stop
# when $3 is "fail", and gets the block appended when $3 is "append".
replace_block() {
    local name=$1 block=$2 without_markers=$3
    if ! grep -q "^<!-- $name:start" "$RESULTS_PAGE"; then
        [[ $without_markers == append ]] || die "$RESULTS_PAGE has no <!-- $name:start --> marker"
        { echo; cat "$block"; } >>"$RESULTS_PAGE"
        log "appended the $name block to $RESULTS_PAGE"
        return
    fi
    awk -v block="$block" -v start="^<!-- $name:start" -v end="^<!-- $name:end -->" '
        $0 ~ start { while ((getline line < block) > 0) print line; skipping = 1; next }
        $0 ~ end { skipping = 0; next }
        !skipping { print }
    ' "$RESULTS_PAGE" >"$WORK/page.md"
    cp "$WORK/page.md" "$RESULTS_PAGE"
    log "wrote the $name block of $RESULTS_PAGE"
}

# Prints the versions of the selected systems among Ferrite, InfluxDB and
# VictoriaMetrics, separated by "; ".
storage_system_versions() {
    local versions="" system
    for system in $(selected ferrite influxdb victoriametrics); do
        case $system in
            ferrite) versions+="$(ferrite_version); " ;;
            influxdb) versions+="InfluxDB $(dpkg-query -W -f='${Version}' influxdb); " ;;
            victoriametrics) versions+="VictoriaMetrics $(dpkg-query -W -f='${Version}' victoria-metrics); " ;;
        esac
    done
    echo "${versions%; }"
}

# Writes the storage scenario's block of the results page, placed at the end
# of the page the first time.
write_storage_results_page() {
    local block=$WORK/storage-block.md
    local versions
    versions=$(storage_system_versions)
    {
        echo "<!-- storage-results:start (generated by bench/run.sh; edits here are overwritten) -->"
        echo
        echo "### Storage and queries: the IoT fleet dataset"
        echo
        echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$(git -C "$REPO" rev-parse --short HEAD)\`$(git -C "$REPO" diff --quiet HEAD -- crates/ferrite crates/ferrite-bench || echo ' with uncommitted changes')."
        echo "Machine: $(nproc) CPUs, $(lscpu | awk -F': *' '/^Model name/ { print $2; exit }'), $(free -g | awk '/^Mem:/ { print $2 }') GiB of memory."
        echo "Versions: $versions (Debian package versions for the peers)."
        echo
        jq -r '"Dataset: \(.devices) trucks from \(.start) over \(.duration_s) s (seed \(.seed)): \(.lines) lines, \(.field_values) field values, \(.bytes) bytes of line protocol; the generator wrote it in \(.elapsed_s) s (\(.lines_per_s) lines/s)."' \
            "$WORK/generate.json"
        echo
        echo "Settings: ROUNDS=$ROUNDS, STORAGE_BATCH_LINES=$STORAGE_BATCH_LINES, STORAGE_CONNECTIONS=$STORAGE_CONNECTIONS,"
        echo "QUERY_ROUNDS=$QUERY_ROUNDS. Each load starts the system on an empty data directory. The row"
        echo "\`null-sink\` is the same dataset sent to \`ferrite-bench sink\`, which discards it: the"
        echo "generator's ceiling on this machine. Bytes on disk are \`du -B1\` of the data directories"
        echo "after compaction; memory is VmRSS right after the ingest."
        echo
        echo "Compaction per system:"
        echo
        jq -r -s 'map(select(.figure == "storage")) | unique_by(.system)[] | "- \(.system): \(.compaction)"' "$STORAGE_RESULTS"
        echo
        "$BENCH" summary --results "$STORAGE_RESULTS" --reference ferrite
        echo "Commands (one per system; every run of a system used the same):"
        echo
        echo '```text'
        cat "$STORAGE_COMMANDS"
        echo '```'
        echo
        echo "<details><summary>Raw result lines</summary>"
        echo
        echo '```json'
        cat "$STORAGE_RESULTS"
        echo '```'
        echo
        echo "</details>"
        echo
        echo "<!-- storage-results:end -->"
    } >"$block"
    replace_block storage-results "$block" append
}

# Writes the series scenario's block of the results page, placed at the end
# of the page the first time.
write_series_results_page() {
    local block=$WORK/series-block.md
    local versions
    versions=$(storage_system_versions)
    {
        echo "<!-- series-results:start (generated by bench/run.sh; edits here are overwritten) -->"
        echo
        echo "### Resident memory with $(jq -n "$SERIES_DEVICES * 7" | commas) active series"
        echo
        echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$(git -C "$REPO" rev-parse --short HEAD)\`$(git -C "$REPO" diff --quiet HEAD -- crates/ferrite crates/ferrite-tsdb crates/ferrite-bench || echo ' with uncommitted changes')."
        echo "Machine: $(nproc) CPUs, $(lscpu | awk -F': *' '/^Model name/ { print $2; exit }'), $(free -g | awk '/^Mem:/ { print $2 }') GiB of memory."
        echo "Versions: $versions (Debian package versions for the peers)."
        echo
        local extra=$((SERIES_BATCHES * SERIES_BATCH_LINES - SERIES_DEVICES * SERIES_ROUNDS))
        echo "Load: SERIES_DEVICES=$SERIES_DEVICES trucks of 7 fields, SERIES_ROUNDS=$SERIES_ROUNDS points per series."
        ((extra == 0)) || echo "Rounding up to whole batches gave the first $extra trucks one point more."
        echo "The $SERIES_BATCHES batches of $SERIES_BATCH_LINES lines went over $LP_CONNECTIONS connections, with timestamps from"
        echo "$(date -u -d "@$SERIES_START_S" '+%Y-%m-%d %H:%M UTC'), 10 s apart per truck. Each system ran once on an empty data"
        echo "directory. The rate covers the whole load, creating the series included. Memory is VmRSS right"
        echo "after the last acknowledged batch and again after SERIES_SETTLE_S=$SERIES_SETTLE_S s without load;"
        echo "the peak is VmHWM at the second reading. InfluxDB ran with \`max-values-per-tag = 0\` and"
        echo "\`max-series-per-database = 0\`, and its reported series are its tag sets times 7. \"Other processes"
        echo "CPU s\" is the busy time of the rest of the machine during the load, such as other builds."
        if [[ -n "$(selected ferrite)" ]]; then
            echo "Ferrite's memory budget (\`storage.memory_budget_bytes\`) bounds its time-series store; connections,"
            echo "HTTP buffers and the metadata database come on top of it in VmRSS."
        fi
        echo
        echo "| System | series sent | series reported by the server | points per series | field values acknowledged | values/s | server CPU s | other processes CPU s | RSS after load MiB | RSS settled MiB | peak RSS MiB | memory budget | settled RSS / VictoriaMetrics' |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
        jq -s -r "$JQ_NUMBER_FORMAT"'
            map(select(.figure == "series")) as $rows
            | ($rows | map(select(.system == "victoriametrics")) | first | .rss_settled_mib) as $reference
            | $rows[]
            | "| \(.system) | \(.series_sent | commas) | \(.series_reported_by_server // "-" | commas)"
              + " | \(.points_per_series) | \(.points | commas) | \(.points_per_s | floor | commas)"
              + " | \(.server_cpu_s) | \(.other_cpu_s)"
              + " | \(.rss_after_load_mib) | \(.rss_settled_mib) | \(.rss_peak_mib)"
              + " | \(if .system == "ferrite" then (.memory_budget // "not set") else "-" end)"
              + " | \(if $reference then (.rss_settled_mib / $reference | hundredths) else "-" end) |"
        ' "$SERIES_RESULTS"
        echo
        echo "Commands:"
        echo
        echo '```text'
        cat "$SERIES_COMMANDS"
        echo '```'
        echo
        echo "<details><summary>Raw result lines</summary>"
        echo
        echo '```json'
        cat "$SERIES_RESULTS"
        echo '```'
        echo
        echo "</details>"
        echo
        echo "<!-- series-results:end -->"
    } >"$block"
    replace_block series-results "$block" append
}

# Writes the live scenario's block of the results page, placed at the end
# of the page the first time.
write_live_results_page() {
    local block=$WORK/live-block.md
    {
        echo "<!-- live-results:start (generated by bench/run.sh; edits here are overwritten) -->"
        echo
        echo "### Live stream latency: MQTT publish to WebSocket delivery"
        echo
        echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$(git -C "$REPO" rev-parse --short HEAD)\`$(git -C "$REPO" diff --quiet HEAD -- crates/ferrite crates/ferrite-bench || echo ' with uncommitted changes')."
        echo "Machine: $(nproc) CPUs, $(lscpu | awk -F': *' '/^Model name/ { print $2; exit }'), $(free -g | awk '/^Mem:/ { print $2 }') GiB of memory."
        echo "Version: $(ferrite_version), default configuration (\`ingest.durability = \"fsync\"\`)."
        echo
        echo "Load: LIVE_DEVICES=$LIVE_DEVICES MQTT 3.1.1 connections publish QoS 1 at LIVE_RATE=$LIVE_RATE messages/s in"
        echo "total for LIVE_DURATION_S=$LIVE_DURATION_S s after a 2 s warm-up; one WebSocket subscriber reads"
        echo "\`/api/v1/live/ws?key=sent_ns\`. Latency is the subscriber's receive time minus the send time in"
        echo "the payload, both from this machine's wall clock. Generator and server share the machine's CPUs."
        echo "Each round starts a fresh server. \"Late\" counts deliveries slower than 100 ms."
        echo
        echo "| Round | published | delivered | missing | late | lagged notices | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | publishers behind ms | server CPU s | generator CPU s | other processes CPU s |"
        echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        jq -s -r "$JQ_NUMBER_FORMAT"'
            map(select(.figure == "live"))[]
            | "| \(.round) | \(.published | commas) | \(.delivered | commas) | \(.missing | commas) | \(.late | commas)"
              + " | \(.lagged_notices) | \(.latency_ms.p50) | \(.latency_ms.p90) | \(.latency_ms.p99) | \(.latency_ms.p999)"
              + " | \(.latency_ms.max) | \(.behind_ms) | \(.server_cpu_s) | \(.client_cpu_s) | \(.other_cpu_s) |"
        ' "$LIVE_RESULTS"
        echo
        echo "Command:"
        echo
        echo '```text'
        cat "$LIVE_COMMANDS"
        echo '```'
        echo
        echo "<details><summary>Raw result lines</summary>"
        echo
        echo '```json'
        cat "$LIVE_RESULTS"
        echo '```'
        echo
        echo "</details>"
        echo
        echo "<!-- live-results:end -->"
    } >"$block"
    replace_block live-results "$block" append
}

# Prints the first lines of the scenario blocks: the time, the commit and
# the machine. The arguments are the source folders whose uncommitted
# changes the commit line mentions.
block_preamble() {
    echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$(git -C "$REPO" rev-parse --short HEAD)\`$(git -C "$REPO" diff --quiet HEAD -- "$@" || echo ' with uncommitted changes')."
    echo "Machine: $(nproc) CPUs, $(lscpu | awk -F': *' '/^Model name/ { print $2; exit }'), $(free -g | awk '/^Mem:/ { print $2 }') GiB of memory."
    echo "Version: $(ferrite_version), default configuration (\`ingest.durability = \"fsync\"\`)."
}

# Writes the coap scenario's block of the results page, placed at the end
# of the page the first time.
write_coap_results_page() {
    local block=$WORK/coap-block.md
    {
        echo "<!-- coap-results:start (generated by bench/run.sh; edits here are overwritten) -->"
        echo
        echo "### CoAP Confirmable telemetry and MQTT QoS 1 with one message in flight"
        echo
        block_preamble crates/ferrite crates/ferrite-bench
        echo
        echo "Load: COAP_DEVICES=$COAP_DEVICES simulated devices, each with its own UDP socket and one Confirmable"
        echo "POST outstanding, for COAP_DURATION_S=$COAP_DURATION_S s after a 2 s warm-up. Then, on the same server,"
        echo "$COAP_DEVICES MQTT 3.1.1 connections publish QoS 1 with one message in flight each for as long."
        echo "Each round starts a fresh server. Latency is the time from the first send of a request to its"
        echo "2.04 response or PUBACK. The ratio is CoAP's rate divided by MQTT's in the same round."
        echo
        echo "| Round | CoAP 2.04/s | CoAP p50 ms | CoAP p99 ms | CoAP max ms | retransmissions | CoAP errors | MQTT PUBACKs/s | MQTT p50 ms | MQTT p99 ms | CoAP / MQTT |"
        echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        jq -s -r "$JQ_NUMBER_FORMAT"'
            group_by(.round)[]
            | (map(select(.figure == "coap")) | first) as $coap
            | (map(select(.figure == "mqtt")) | first) as $mqtt
            | "| \($coap.round) | \($coap.acks_per_s | floor | commas) | \($coap.latency_ms.p50) | \($coap.latency_ms.p99)"
              + " | \($coap.latency_ms.max) | \($coap.retransmissions | commas) | \($coap.errors | commas)"
              + " | \($mqtt.acks_per_s | floor | commas) | \($mqtt.latency_ms.p50) | \($mqtt.latency_ms.p99)"
              + " | \(if $mqtt.acks_per_s > 0 then ($coap.acks_per_s / $mqtt.acks_per_s | hundredths) else "-" end) |"
        ' "$COAP_RESULTS"
        echo
        echo "Medians over the rounds (minimum to maximum in brackets):"
        echo
        jq -s -r "$JQ_NUMBER_FORMAT"'
            def median: sort | .[(length - 1) / 2 | floor];
            def spread(f): map(f) | "\(median) (\(min) to \(max))";
            (map(select(.figure == "coap"))) as $coap
            | (map(select(.figure == "mqtt"))) as $mqtt
            | [group_by(.round)[]
               | (map(select(.figure == "coap")) | first | .acks_per_s) / (map(select(.figure == "mqtt")) | first | .acks_per_s)
               | hundredths | tonumber] as $ratios
            | "- CoAP: \($coap | spread(.acks_per_s | round)) responses/s, p50 \($coap | spread(.latency_ms.p50)) ms, p99 \($coap | spread(.latency_ms.p99)) ms.",
              "- MQTT QoS 1, one in flight: \($mqtt | spread(.acks_per_s | round)) PUBACKs/s, p50 \($mqtt | spread(.latency_ms.p50)) ms, p99 \($mqtt | spread(.latency_ms.p99)) ms.",
              "- CoAP / MQTT rate: \($ratios | spread(.))."
        ' "$COAP_RESULTS"
        echo
        echo "Commands:"
        echo
        echo '```text'
        cat "$COAP_COMMANDS"
        echo '```'
        echo
        echo "<details><summary>Raw result lines</summary>"
        echo
        echo '```json'
        cat "$COAP_RESULTS"
        echo '```'
        echo
        echo "</details>"
        echo
        echo "<!-- coap-results:end -->"
    } >"$block"
    replace_block coap-results "$block" append
}

# Writes the lorawan scenario's block of the results page, placed at the
# end of the page the first time.
write_lorawan_results_page() {
    local block=$WORK/lorawan-block.md
    {
        echo "<!-- lorawan-results:start (generated by bench/run.sh; edits here are overwritten) -->"
        echo
        echo "### LoRaWAN uplinks through a simulated Semtech UDP gateway"
        echo
        block_preamble crates/ferrite crates/ferrite-lorawan crates/ferrite-bench
        echo
        echo "Load: ABP devices (EU868, Cayenne LPP profile, one temperature per uplink), LORAWAN_DEVICES=$LORAWAN_DEVICES"
        echo "or one per uplink/s of the rate if that is more, behind one gateway; one uplink per PUSH_DATA"
        echo "datagram, paced to the offered rate for LORAWAN_SEND_S=$LORAWAN_SEND_S s. Each rate starts a fresh server,"
        echo "and a round stops at its first rate that was not kept up. \"Uplinks\" is"
        echo "\`ferrite_lorawan_uplinks_total{outcome=\"stored\"}\` (appended to the ingest log) and \"points\" is"
        echo "\`ferrite_pipeline_points_total{protocol=\"lorawan\"}\` (decoded and written to the store), both as"
        echo "increases over the run. \"Store s\" runs from the first datagram until the last point was"
        echo "stored, from samples of \`/metrics\` about every 0.1 s, and includes the 200 ms deduplication"
        echo "window; \"stored/s\" is points divided by it. \"Lag\" is the part of it after the last datagram"
        echo "was due. A run is kept up when every PUSH_ACK arrived, every uplink was stored and decoded and"
        echo "the lag was at most LORAWAN_MAX_LAG_S=$LORAWAN_MAX_LAG_S s. \"UDP drops\" is the machine's RcvbufErrors"
        echo "(\`/proc/net/snmp\`) over the run: datagrams the kernel dropped because a socket's receive buffer was full."
        echo
        echo "| Round | offered uplinks/s | devices | sent | PUSH_ACKs | UDP drops | uplinks stored | overloaded | points | store s | stored/s | lag s | server CPU s | generator CPU s | other processes CPU s | kept up |"
        echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        jq -s -r "$JQ_NUMBER_FORMAT"'
            .[]
            | "| \(.round) | \(.rate_offered | commas) | \(.devices | commas) | \(.uplinks_sent | commas)"
              + " | \(.push_acks | commas) | \(.udp_receive_buffer_errors | commas) | \(.uplinks_stored | commas) | \(.uplinks_overloaded | commas)"
              + " | \(.points_decoded | commas) | \(.store_s // "-") | \(.stored_per_s // "-" | commas) | \(.lag_s // "-")"
              + " | \(.server_cpu_s) | \(.client_cpu_s) | \(.other_cpu_s) | \(if .kept_up then "yes" else "no" end) |"
        ' "$LORAWAN_RESULTS"
        echo
        jq -s -r "$JQ_NUMBER_FORMAT"'
            def median: sort | .[(length - 1) / 2 | floor];
            [group_by(.round)[] | map(select(.kept_up)) | max_by(.rate_offered) // {rate_offered: 0, stored_per_s: 0}] as $best
            | "Highest offered rate kept up, per round: \($best | map(.rate_offered | commas) | join(", ")) uplinks/s"
              + " (median \($best | map(.rate_offered) | median | commas)); stored/s at that rate: "
              + "\($best | map(.stored_per_s | commas) | join(", ")). The next step of LORAWAN_RATES"
              + " is an upper bound only where a round reached it and failed; 0 means a round kept up with no rate."
        ' "$LORAWAN_RESULTS"
        echo
        echo "Commands (one per rate):"
        echo
        echo '```text'
        cat "$LORAWAN_COMMANDS"
        echo '```'
        echo
        echo "<details><summary>Raw result lines</summary>"
        echo
        echo '```json'
        cat "$LORAWAN_RESULTS"
        echo '```'
        echo
        echo "</details>"
        echo
        echo "<!-- lorawan-results:end -->"
    } >"$block"
    replace_block lorawan-results "$block" append
}

# jq functions that write an integer with commas between thousands and a
# non-negative number with two decimals.
JQ_NUMBER_FORMAT='def commas: tostring | if length > 3 then (.[0:length - 3] | commas) + "," + .[length - 3:] else . end;
def hundredths: . * 100 | round | "\(. / 100 | floor).\(. % 100 + 100 | tostring | .[1:])";'

# Prints the number on standard input, rounded down, with commas between thousands.
commas() {
    jq -r "$JQ_NUMBER_FORMAT"' floor | commas'
}

# ---------------------------------------------------------------- main ---

main() {
    install_missing
    local packages=(-p ferrite-bench)
    [[ -n "$(selected ferrite)" ]] && packages+=(-p ferrite)
    if [[ "$BUILD" == 1 ]]; then
        log "building the release binaries"
        (cd "$REPO" && cargo build --release "${packages[@]}")
    else
        [[ -x "$BENCH" ]] || die "$BENCH is missing; build it with cargo build --release -p ferrite-bench, or run without BUILD=0"
        [[ -z "$(selected ferrite)" || -x "$FERRITE" ]] ||
            die "$FERRITE is missing; build it with cargo build --release -p ferrite, or run without BUILD=0"
        log "using the release binaries as built (BUILD=0)"
    fi

    # Each server and generator needs a descriptor per connection.
    ulimit -n "$(ulimit -Hn)"
    mkdir -p "$WORK/logs"
    : >"$RESULTS"
    : >"$STORAGE_RESULTS"
    : >"$SERIES_RESULTS"
    if [[ -n "$(selected ferrite)" ]]; then
        prepare_ferrite_template
        if scenario_enabled storage || scenario_enabled series || scenario_enabled lorawan; then
            prepare_ferrite_storage_template
        fi
    else
        # Mosquitto accepts any username, so names stand in for device tokens.
        seq -f 'bench-device-%g' 0 $((MQTT_DEVICES - 1)) >"$WORK/tokens"
    fi
    # One fixed start time, so every lp run sends byte-identical bodies.
    LP_START_S=$(($(date +%s) - 24 * 3600))
    DATASET_ARGS=(--devices "$STORAGE_DEVICES" --start "$STORAGE_START" --duration "$STORAGE_DURATION"
        --seed "$STORAGE_SEED")

    local round system
    if scenario_enabled lp; then
        for round in $(seq 1 "$ROUNDS"); do
            for system in $(selected ferrite influxdb victoriametrics); do
                log "lp round $round: $system"
                run_lp "$system" "$round"
            done
        done
    fi
    if scenario_enabled durability; then
        for system in $(selected ferrite influxdb victoriametrics); do
            log "durability: $system killed right after an acknowledged batch"
            check_durability "$system"
        done
    fi
    if scenario_enabled mqtt; then
        for round in $(seq 1 "$ROUNDS"); do
            for system in $(selected ferrite mosquitto); do
                log "mqtt round $round: $system"
                run_mqtt "$system" "$round"
            done
        done
        for system in $(selected ferrite mosquitto); do
            log "mqtt with two generator processes: $system"
            run_mqtt_split "$system"
        done
    fi
    if scenario_enabled coap && [[ -n "$(selected ferrite)" ]]; then
        for round in $(seq 1 "$ROUNDS"); do
            log "coap round $round: Ferrite over CoAP and MQTT with $COAP_DEVICES devices"
            run_coap "$round"
        done
        summarize_coap | tee "$WORK/coap.md" >&2
        write_coap_results_page
    fi
    if scenario_enabled memory; then
        for system in $(selected ferrite mosquitto); do
            log "memory: $system with $IDLE_CONNECTIONS idle connections"
            run_memory "$system"
        done
    fi
    echo "This run has no profile: the profile scenario, Ferrite or perf was not selected or installed." >"$WORK/profile.md"
    if scenario_enabled profile && [[ -n "$(selected ferrite)" ]] && command -v perf >/dev/null; then
        log "profiling Ferrite during one more lp run"
        profile_ferrite_lp
    fi
    if [[ -s "$RESULTS" ]]; then
        write_results_page
        "$BENCH" summary --results "$RESULTS" --reference ferrite
    fi

    if scenario_enabled storage; then
        run_storage_scenario
        "$BENCH" summary --results "$STORAGE_RESULTS" --reference ferrite
    fi
    if scenario_enabled series; then
        run_series_scenario
    fi
    if scenario_enabled live && [[ -n "$(selected ferrite)" ]]; then
        : >"$LIVE_RESULTS"
        for round in $(seq 1 "$ROUNDS"); do
            log "live round $round: ferrite, $LIVE_RATE messages/s from $LIVE_DEVICES connections"
            run_live "$round"
        done
        write_live_results_page
    fi
    if scenario_enabled lorawan && [[ -n "$(selected ferrite)" ]]; then
        run_lorawan_scenario
        write_lorawan_results_page
    fi
}

# Sourcing the script (for trying one function) defines the functions only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
