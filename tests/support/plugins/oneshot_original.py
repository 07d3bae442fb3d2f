#!/usr/bin/env python3
"""An original-style (one process per call) ``command`` plugin program: reads all of stdin,
writes one JSON object (pretty-printed over several lines) and exits."""
import json
import os
import sys

msg = json.load(sys.stdin)
if msg.get("path") == "/block":
    out = {"short_circuit": {"status": 403, "body": "blocked by oneshot"}}
elif msg.get("path") == "/fail":
    sys.exit(2)
else:
    out = {"set_headers": {"X-Oneshot-Pid": str(os.getpid()),
                           "X-Seen-Stage": msg["stage"]}}
json.dump(out, sys.stdout, indent=2)
sys.stdout.write("\n")
