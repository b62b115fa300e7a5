#!/bin/bash
# One live migration of a 1 GiB prefaulted idle guest with the nfvisor
# binary given (to compare two builds in one session).
# usage: scripts/migrate-once.sh BINARY -> total_ms downtime_ms zero_pages untouched_pages
B=$1; D=$(mktemp -d); 
$B receive --listen unix:$D/in.sock --serial /dev/null >/dev/null 2>&1 &
DST=$!
$B run --memory 1G --prefault --serial /dev/null --control-socket $D/src.sock --cmdline "samples=10000000 period_us=1000" >/dev/null 2>&1 &
SRC=$!
for i in $(seq 1 600); do [ -S $D/src.sock ] && [ -S $D/in.sock ] && break; sleep 0.05; done
sleep 0.3
$B migrate --control-socket $D/src.sock --to unix:$D/in.sock --json 2>/dev/null | python3 -c "import json,sys; m=json.load(sys.stdin)['migration']; print(m['total_ms'], m['downtime_ms'], m['zero_pages'], m['untouched_pages'])"
kill $DST $SRC 2>/dev/null; wait 2>/dev/null; rm -rf $D
