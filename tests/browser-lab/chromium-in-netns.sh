#!/bin/sh
# Debian's Chromium in the network namespace $MOSELLE_CHROMIUM_NETNS (one of
# tests/netlab.sh's hosts), for tests that need browsers on two hosts.
# Playwright talks to it over inherited pipes, which `ip netns exec` keeps.
exec ip netns exec "$MOSELLE_CHROMIUM_NETNS" /usr/bin/chromium "$@"
