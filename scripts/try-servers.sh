#!/usr/bin/env bash
# Servers to try dbmtls against (the README's "By hand" walk-through): a Redis and a PostgreSQL
# that accept only TLS clients presenting a certificate from DIR/pki/ca, like the databases of
# the README story.  Everything lives in DIR; nothing else on the machine changes.
#
#   scripts/try-servers.sh start DIR   # Redis on 127.0.0.1:16379, PostgreSQL on 127.0.0.1:15432
#   scripts/try-servers.sh stop DIR    # stops both and removes their data
#
# DIR must hold pki/ca/ca.crt and pki/server/tls.{crt,key} (dbmtls certs ca / certs issue).
# PostgreSQL gets a user for every client certificate's CN you pass as TRY_USERS (default
# "jinsu"); its pg_hba.conf asks for the certificate ("cert"), so the CN is the login.
# Ports: REDIS_PORT and PG_PORT.  PostgreSQL refuses to run as root: as root, its part runs as
# the "postgres" user (Debian's packages create it).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
dir=$(cd "$dir" && pwd)
REDIS_PORT=${REDIS_PORT:-16379}
PG_PORT=${PG_PORT:-15432}
TRY_USERS=${TRY_USERS:-jinsu}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
data="$dir/try-servers"

die() { echo "try-servers: $*" >&2; exit 1; }
as_pg() {  # run a PostgreSQL command as its owner
  if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi
}

start() {
  for f in pki/ca/ca.crt pki/server/tls.crt pki/server/tls.key; do
    [ -f "$dir/$f" ] || die "$dir/$f is missing: run dbmtls certs ca / certs issue first (README, By hand)"
  done
  command -v redis-server >/dev/null || die "redis-server is not installed (scripts/setup.sh installs it)"
  [ -n "$PG_BIN" ] || die "PostgreSQL is not installed (scripts/setup.sh installs it)"
  [ -e "$data" ] && die "$data exists: run '$0 stop $dir' first"
  mkdir -p "$data/redis"
  # As root, PostgreSQL's files go where the postgres user can reach them (DIR may sit under a
  # directory only root can enter); DIR remembers where.
  if [ "$(id -u)" = 0 ]; then
    pg=$(mktemp -d /tmp/dbmtls-try-pg.XXXXXX)
    chown postgres: "$pg"
  else
    pg="$data/pg"
    mkdir -p "$pg"
  fi
  echo "$pg" > "$data/pg.path"

  redis-server --port 0 --tls-port "$REDIS_PORT" --bind 127.0.0.1 \
    --tls-cert-file "$dir/pki/server/tls.crt" --tls-key-file "$dir/pki/server/tls.key" \
    --tls-ca-cert-file "$dir/pki/ca/ca.crt" --tls-auth-clients yes \
    --save '' --appendonly no --dir "$data/redis" \
    --daemonize yes --pidfile "$data/redis/redis.pid" --logfile "$data/redis/redis.log"

  # PostgreSQL: its own copy of the server key (it must own it, mode 0600), TLS only over TCP
  as_pg "$PG_BIN/initdb" -D "$pg/data" -U postgres --auth=trust --no-sync >/dev/null
  for f in "$dir/pki/server/tls.crt" "$dir/pki/server/tls.key" "$dir/pki/ca/ca.crt"; do
    if [ "$(id -u)" = 0 ]; then
      install -o postgres -g postgres -m 600 "$f" "$pg/data/"
    else
      install -m 600 "$f" "$pg/data/"
    fi
  done
  as_pg tee -a "$pg/data/postgresql.conf" >/dev/null <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$pg'
ssl = on
ssl_cert_file = 'tls.crt'
ssl_key_file = 'tls.key'
ssl_ca_file = 'ca.crt'
EOF
  printf 'local all postgres trust\nhostssl all all 127.0.0.1/32 cert\n' | as_pg tee "$pg/data/pg_hba.conf" >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" -w start >/dev/null
  for user in $TRY_USERS; do
    as_pg psql -X -q -h "$pg" -p "$PG_PORT" -U postgres -d postgres -c "CREATE ROLE \"$user\" LOGIN"
  done
  echo "try-servers: Redis on 127.0.0.1:$REDIS_PORT and PostgreSQL on 127.0.0.1:$PG_PORT (TLS, client certificates from $dir/pki/ca)"
}

stop() {
  if [ -f "$data/redis/redis.pid" ]; then
    kill "$(cat "$data/redis/redis.pid")" 2>/dev/null || true
  fi
  if [ -f "$data/pg.path" ]; then
    pg=$(cat "$data/pg.path")
    if [ -d "$pg/data" ]; then
      as_pg "$PG_BIN/pg_ctl" -D "$pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    case "$pg" in /tmp/dbmtls-try-pg.*|"$data"/pg) rm -rf "$pg" ;; esac
  fi
  rm -rf "$data"
  echo "try-servers: stopped"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
