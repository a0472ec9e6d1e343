#!/usr/bin/env bash
# Re-records the PostgreSQL fixtures of tracer-user/tests/fixtures/postgres from real traffic.
#
# Needs: PostgreSQL 15 server binaries, psql, pgbench, ruby-pg, python3 (Debian packages
# postgresql-15, ruby-pg). Runs a throw-away server as the `postgres` user on 127.0.0.1:$PGPORT
# (password auth: scram-sha-256) and records through pg_record_proxy.py on $PROXY_PORT.
# Loopback only; every client run is short and bounded by `timeout`.
#
# The recorded files land in $OUT (default /tmp/pg-fixtures); they are then reviewed, the large
# result trimmed by hand with cap=N and \{N} filler, and copied into the fixture folder.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGPORT=${PGPORT:-54329}
PROXY_PORT=${PROXY_PORT:-54400}
OUT=${OUT:-/tmp/pg-fixtures}
DATA=$(mktemp -d /tmp/pgcap.XXXXXX)
PY=/usr/bin/python3
mkdir -p "$OUT"
chown postgres "$DATA"

su postgres -c "$BIN/initdb -D $DATA/data -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C" >/dev/null
cat >>"$DATA/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$DATA'
password_encryption = 'scram-sha-256'
ssl = off
EOF
su postgres -c "$BIN/pg_ctl -D $DATA/data -l $DATA/log -w start" >/dev/null
trap 'su postgres -c "$BIN/pg_ctl -D $DATA/data -m fast -w stop" >/dev/null; rm -rf "$DATA"' EXIT

psql -h "$DATA" -p "$PGPORT" -U postgres -q -c "CREATE ROLE app LOGIN PASSWORD 'secret-pw'" -c "CREATE DATABASE appdb OWNER app"
export PGPASSWORD=secret-pw
DIRECT="host=127.0.0.1 port=$PGPORT user=app dbname=appdb"
export CONN="host=127.0.0.1 port=$PROXY_PORT user=app dbname=appdb"
psql "$DIRECT" -q -c "CREATE TABLE cats(id serial PRIMARY KEY, name text, age int)" \
    -c "INSERT INTO cats(name, age) VALUES ('tom', 3), ('felix', 5)"
timeout 60 pgbench -q -i -s 1 "$DIRECT" >/dev/null 2>&1

# record NAME CONNS [--server-view] -- COMMAND...: runs COMMAND through a fresh proxy.
record() {
    local name=$1 conns=$2
    shift 2
    local view=()
    if [ "$1" = --server-view ]; then view=(--server-view); shift; fi
    [ "$1" = -- ] && shift
    local out="$OUT/$name.seg"
    [ "$conns" -gt 1 ] && out="$OUT/$name-{n}.seg"
    $PY "$HERE/pg_record_proxy.py" --listen "$PROXY_PORT" --target "127.0.0.1:$PGPORT" \
        --out "$out" --conns "$conns" --timeout 30 "${view[@]}" &
    local proxy=$!
    sleep 0.5
    timeout 30 "$@" >/dev/null 2>&1 || true
    wait "$proxy"
}

record psql_crud 1 -- psql "$CONN" \
    -c "SELECT id, name FROM cats WHERE name = 'tom' AND age > 2" \
    -c "INSERT INTO cats(name, age) VALUES ('garfield', 7)" \
    -c "UPDATE cats SET age = 8 WHERE name = 'garfield'" \
    -c "DELETE FROM cats WHERE name = 'garfield'"
record psql_errors 1 -- psql "$CONN" -c "SELECT * FROM nope" -c "SELECT 1/0" -c "SELECT 2"
record psql_multi_statement 1 -- psql "$CONN" \
    -c "BEGIN; INSERT INTO cats(name, age) VALUES ('multi', 1); COMMIT"
record psql_transaction 1 -- psql "$CONN" -c "BEGIN" \
    -c "UPDATE cats SET age = age + 1 WHERE id = 1" -c "SELECT age FROM cats WHERE id = 1" -c "COMMIT"
record psql_copy 1 -- sh -c "printf 'kitty\t1\nsylvester\t2\n' | psql '$CONN' \
    -c 'COPY cats(name, age) FROM STDIN' -c 'COPY (SELECT name, age FROM cats ORDER BY id) TO STDOUT' \
    -c \"DELETE FROM cats WHERE name IN ('kitty', 'sylvester')\""
record psql_nossl 1 -- psql "$CONN sslmode=disable" -c "SELECT 'no ssl' AS s"
record psql_large_result 1 -- psql "$CONN" -c "SELECT repeat('x', 200000) AS big, 42 AS n" \
    -c "SELECT count(*) FROM cats WHERE age < 100"
record psql_copy_large 1 -- sh -c "seq 1 3000 | sed 's/.*/cat&\t&/' | psql '$CONN' \
    -c 'COPY cats(name, age) FROM STDIN' -c \"DELETE FROM cats WHERE name LIKE 'cat%'\" -c 'SELECT 1'"
record ruby_long_statement 1 -- ruby -rpg -e '
c = PG.connect(ENV.fetch("CONN"))
cols = (1..300).map { |i| "name AS n#{i}" }.join(", ")
c.exec_params("SELECT #{cols} FROM cats WHERE id = $1", [1]).to_a
c.exec_params("SELECT count(*) FROM cats WHERE age > $1", [0]).to_a
c.close'

record server_side_psql 1 --server-view -- psql "$CONN" \
    -c "SELECT name FROM cats WHERE id = 2" -c "SELECT * FROM nope"
record ruby_extended 1 -- ruby -rpg -e '
c = PG.connect(ENV.fetch("CONN"))
c.exec_params("SELECT name, age FROM cats WHERE id = $1 AND name <> $2", [1, "x"]).to_a
c.prepare("ins", "INSERT INTO cats(name, age) VALUES ($1, $2)")
c.exec_prepared("ins", ["pepper", 4])
c.exec_prepared("ins", ["salt", 5])
c.exec_params("DELETE FROM cats WHERE name IN ($1, $2)", ["pepper", "salt"])
c.close'
record ruby_extended_errors 1 -- ruby -rpg -e '
c = PG.connect(ENV.fetch("CONN"))
begin; c.exec_params("SELECT 10 / $1::int", [0]); rescue PG::Error; end
begin; c.exec_params("SELEC oops $1", [1]); rescue PG::Error; end
begin; c.prepare("bad", "SELECT * FROM nope WHERE id = $1"); rescue PG::Error; end
c.exec_params("SELECT $1::int + 1", [41]).to_a
c.close'
record ruby_pipeline 1 -- ruby -rpg -e '
c = PG.connect(ENV.fetch("CONN"))
c.enter_pipeline_mode
c.send_query_params("SELECT $1::int AS a", [1])
c.send_query_params("SELECT 1 / $1::int", [0])
c.send_query_params("SELECT $1::text AS skipped", ["never"])
c.pipeline_sync
c.send_query_params("INSERT INTO cats(name, age) VALUES ($1, $2)", ["pipe", 9])
c.send_query_params("DELETE FROM cats WHERE name = $1", ["pipe"])
c.pipeline_sync
n = 0
loop do
  r = c.get_result
  if r.nil?
    next
  end
  n += 1 if r.result_status == PG::PGRES_PIPELINE_SYNC
  break if n == 2
end
c.exit_pipeline_mode
c.close'
record pgbench_extended 2 -- pgbench -M extended -t 2 -c 1 -n "$CONN"
record pgbench_prepared 2 -- pgbench -M prepared -t 1 -c 1 -n -S "$CONN"
record psycopg2_simple 1 -- $PY -c '
import os, psycopg2
c = psycopg2.connect(os.environ["CONN"])
cur = c.cursor()
cur.execute("SELECT name FROM cats WHERE age > %s AND name <> %s", (1, "it'"'"'s"))
cur.fetchall()
c.commit()
c.close()'
echo "recorded into $OUT"

# With INSTALL=1, (re)build tracer-user/tests/fixtures/postgres/*.seg from the recordings:
# a comment line each, big segments trimmed with pg_cap_fixture.py, and the derived fixtures
# (attached mid-stream, closed early). Hand-written ones (not_postgres_http, ssl_accepted) are
# kept. Review the `.actual` files the golden test then writes before accepting them.
[ "${INSTALL:-0}" = 1 ] || exit 0
F=$HERE/../../tracer-user/tests/fixtures/postgres
mkdir -p "$F"
put() { # NAME SOURCE COMMENT
    { echo "# $3"; echo "# Recorded from real traffic by tests/fixtures-capture/pg_capture_all.sh (PostgreSQL 15)."; cat "$2"; } >"$F/$1.seg"
}
capped() { # NAME CAP COMMENT
    $PY "$HERE/pg_cap_fixture.py" --cap "$2" --min 512 "$OUT/$1.seg" >"$OUT/$1.capped"
    put "$1" "$OUT/$1.capped" "$3"
}
put psql_crud "$OUT/psql_crud.seg" "psql, SSLRequest refused, SCRAM password auth, then SELECT/INSERT/UPDATE/DELETE with literals."
put psql_errors "$OUT/psql_errors.seg" "psql: a missing table, a division by zero, then a good query."
put psql_multi_statement "$OUT/psql_multi_statement.seg" "psql: one Query message holding BEGIN; INSERT; COMMIT."
put psql_transaction "$OUT/psql_transaction.seg" "psql: BEGIN, UPDATE, SELECT, COMMIT as separate queries."
put psql_copy "$OUT/psql_copy.seg" "psql: COPY FROM STDIN, COPY TO STDOUT, DELETE."
put psql_nossl "$OUT/psql_nossl.seg" "psql with sslmode=disable: StartupMessage without SSLRequest."
put server_side_psql "$OUT/server_side_psql.seg" "The server's view (directions flipped): the traced process reads the queries."
put ruby_extended "$OUT/ruby_extended.seg" "ruby-pg exec_params, prepare + exec_prepared (named statement), exec_params with an IN list."
put ruby_extended_errors "$OUT/ruby_extended_errors.seg" "ruby-pg: error at Bind (1/0 folded), syntax error at Parse, failed prepare, then a good query."
put ruby_pipeline "$OUT/ruby_pipeline.seg" "ruby-pg pipeline mode: 3 queries (2nd fails at Bind, 3rd skipped), Sync, 2 more, Sync."
put psycopg2_simple "$OUT/psycopg2_simple.seg" "psycopg2: client-side parameters (simple Query), BEGIN/COMMIT."
put pgbench_extended "$OUT/pgbench_extended-2.seg" "pgbench -M extended -t 2 (TPC-B-like: BEGIN, UPDATE, SELECT, UPDATE, INSERT, END)."
put pgbench_prepared "$OUT/pgbench_prepared-2.seg" "pgbench -M prepared -S -t 1: PQprepare (Parse+Sync) then Bind/Describe/Execute/Sync."
capped psql_large_result 64 "psql: a 200 KB row, then a small query. Big reads keep their first 64 bytes (cap=64), as the kernel capture would."
capped psql_copy_large 64 "psql: COPY FROM STDIN of 3000 rows (CopyData headers beyond the capture: request framing lost), then two queries."
capped ruby_long_statement 256 "ruby-pg exec_params of a 4 KB statement (Parse cut at 256 bytes, Bind/Describe/Execute/Sync not captured), a wide row, then a small query."
{ echo "# ruby_extended.seg without its startup: the tracer attached to a connection in progress."
  awk '/^> 9000 /{on=1} on' "$OUT/ruby_extended.seg"; } >"$F/midstream_extended.seg"
{ echo "# server_side_psql.seg without its startup: attached to a server connection in progress."
  awk '/^< 9000 /{on=1} on' "$OUT/server_side_psql.seg"; } >"$F/midstream_server.seg"
{ echo "# psql_large_result.seg cut short: the connection is reset while the 200 KB row is arriving."
  grep -v '^#' "$F/psql_large_result.seg" | awk '/^< 11000 /{exit} {print}'; echo "reset 10500"; } >"$F/closed_mid_result.seg"
{ echo "# ruby_pipeline.seg cut short: closed after the first batch's answers, the second batch unanswered."
  grep -v '^#' "$F/ruby_pipeline.seg" | awk '/^< 12000 /{exit} {print}'; echo "close 11500"; } >"$F/closed_mid_pipeline.seg"
echo "installed into $F"
