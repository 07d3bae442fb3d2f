#!/bin/sh
# A persistent command plugin program that ignores SIGTERM and leaves a grandchild
# running: close() must SIGKILL it (after the grace period) and its whole process group.
trap '' TERM
sleep 300 &
child=$!
while read -r line; do
    printf '{"set_headers": {"X-Cmd-Pid": "%s", "X-Grandchild": "%s"}}\n' "$$" "$child"
done
