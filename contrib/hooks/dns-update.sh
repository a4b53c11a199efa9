#!/bin/sh
# hamgr on_promote hook: point a DNS name at the new master's service address with a
# signed dynamic update (RFC 2136, nsupdate from bind9-dnsutils).
#
#   [hooks]
#   on_promote = "/etc/hamgr/hooks/dns-update.sh"
#
# Settings come from /etc/hamgr/dns-update.conf (or $HAMGR_DNS_CONF), shell syntax:
#   DNS_SERVER=ns1.example.com     # primary server of the zone
#   DNS_NAME=web1.ha.example.com.  # the record clients use (default: <cluster>.ha.example.com.)
#   DNS_TTL=30                     # keep short: clients re-resolve after a failover
#   DNS_KEY=/etc/hamgr/ddns.key    # TSIG key file for nsupdate -k (mode 0600)
#   DNS_ADDRESS=                   # publish this address instead of the service host
#
# hamgr passes HAMGR_CLUSTER, HAMGR_NODE, HAMGR_ROLE, HAMGR_EPOCH, HAMGR_SERVICE_ADDRESS,
# HAMGR_MASTER_NODE, HAMGR_MASTER_SERVICE_ADDRESS, HAMGR_PEER_NODE and HAMGR_HOOK.
# A non-zero exit is logged by hamgr (the promotion itself stands).
set -eu

conf=${HAMGR_DNS_CONF:-/etc/hamgr/dns-update.conf}
# shellcheck disable=SC1090
[ -r "$conf" ] && . "$conf"

if [ "${HAMGR_ROLE:-}" != "primary" ]; then
    echo "dns-update: role is ${HAMGR_ROLE:-unknown}, nothing to announce"
    exit 0
fi
: "${HAMGR_SERVICE_ADDRESS:?hamgr did not pass HAMGR_SERVICE_ADDRESS}"
: "${DNS_SERVER:?set DNS_SERVER in $conf}"
name=${DNS_NAME:-${HAMGR_CLUSTER}.ha.example.com.}
ttl=${DNS_TTL:-30}
key=${DNS_KEY:-/etc/hamgr/ddns.key}

# HOST:PORT or [IPv6]:PORT → the host part.
host=${HAMGR_SERVICE_ADDRESS%:*}
host=${host#\[}
host=${host%\]}
address=${DNS_ADDRESS:-$host}
case "$address" in
    *:*) type=AAAA ;;
    *) type=A ;;
esac

nsupdate -k "$key" -t 10 <<UPDATE
server $DNS_SERVER
update delete $name $type
update add $name $ttl $type $address
send
UPDATE
echo "dns-update: $name $type $address (epoch $HAMGR_EPOCH, node $HAMGR_NODE)"
