#!/bin/sh
# hamgr on_promote hook: rewrite a reverse proxy's upstream to the new master and reload
# the proxy. Shown for nginx (stream or http upstream block); for HAProxy set
# PROXY_TEMPLATE to a `server` line and PROXY_RELOAD to its reload command.
#
#   [hooks]
#   on_promote = "/etc/hamgr/hooks/proxy-upstream.sh"
#
# Settings from /etc/hamgr/proxy-upstream.conf (or $HAMGR_PROXY_CONF), shell syntax:
#   PROXY_FILE=/etc/nginx/hamgr/web1-upstream.conf   # included by the proxy's config
#   PROXY_PORT=443              # the application's port on the master (default: the
#                               # port of HAMGR_SERVICE_ADDRESS, i.e. the NBD export)
#   PROXY_TEMPLATE='upstream hamgr_%s { server %s; }'   # printf: cluster, HOST:PORT
#   PROXY_CHECK='nginx -t'      # validate before reloading; the old file is restored on failure
#   PROXY_RELOAD='nginx -s reload'
#
# The file is replaced atomically (write, then rename), so the proxy never reads half a file.
set -eu

conf=${HAMGR_PROXY_CONF:-/etc/hamgr/proxy-upstream.conf}
# shellcheck disable=SC1090
[ -r "$conf" ] && . "$conf"

if [ "${HAMGR_ROLE:-}" != "primary" ]; then
    echo "proxy-upstream: role is ${HAMGR_ROLE:-unknown}, nothing to do"
    exit 0
fi
: "${HAMGR_SERVICE_ADDRESS:?hamgr did not pass HAMGR_SERVICE_ADDRESS}"
: "${PROXY_FILE:?set PROXY_FILE in $conf}"
template=${PROXY_TEMPLATE:-'upstream hamgr_%s { server %s; }'}
check=${PROXY_CHECK:-nginx -t}
reload=${PROXY_RELOAD:-nginx -s reload}

host=${HAMGR_SERVICE_ADDRESS%:*}
port=${PROXY_PORT:-${HAMGR_SERVICE_ADDRESS##*:}}
target="$host:$port"

tmp="$PROXY_FILE.hamgr-new"
backup="$PROXY_FILE.hamgr-old"
# shellcheck disable=SC2059
printf "# written by hamgr proxy-upstream.sh: cluster %s, node %s, epoch %s\n$template\n" \
    "$HAMGR_CLUSTER" "$HAMGR_NODE" "$HAMGR_EPOCH" "$HAMGR_CLUSTER" "$target" > "$tmp"
[ -f "$PROXY_FILE" ] && cp -p "$PROXY_FILE" "$backup"
mv -f "$tmp" "$PROXY_FILE"

if ! sh -c "$check"; then
    echo "proxy-upstream: '$check' refused the new upstream; restoring the old file" >&2
    [ -f "$backup" ] && mv -f "$backup" "$PROXY_FILE"
    exit 1
fi
sh -c "$reload"
rm -f "$backup"
echo "proxy-upstream: $PROXY_FILE → $target"
