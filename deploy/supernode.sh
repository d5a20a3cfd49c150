#!/bin/sh
# One SuperNode of the federation profile: TLS to the SuperLink, its partition, and its own token for the cloud
# backbone, read from its own secrets folder (never typed into the compose file). Extra arguments go to
# flower-supernode. Environment: SUPERLINK, CLOUD (host:port), PARTITION, PARTITIONS, TANDEM_SECRETS_DIR.
set -e
d="${TANDEM_SECRETS_DIR:-/run/secrets/tandem}"
: "${SUPERLINK:?}" "${CLOUD:?}" "${PARTITION:?}" "${PARTITIONS:?}"
tls=""  # TLS to the cloud backbone too, with the same CA, unless TANDEM_TLS=off
[ "${TANDEM_TLS:-on}" = off ] || tls=" cloud-tls-dir=\"$d\""
exec "${FLOWER_SUPERNODE:-flower-supernode}" --superlink "$SUPERLINK" --root-certificates "$d/ca.pem" \
  --node-config "partition-id=$PARTITION num-partitions=$PARTITIONS cloud-address=\"$CLOUD\" cloud-token=\"$(cat "$d/token")\"$tls" \
  "$@"
