-- Stand-in slowdown hook for `--dispa-cmd standin:haproxy`: emulates what
-- Dispa does with DISPA_PERF_SLOWDOWN_US (busy-wait that many microseconds of
-- CPU per request), so the CI perf gate's failure path can be demonstrated
-- before Dispa's own server exists.  os.clock() is process CPU time; exact
-- only with nbthread 1 (the gate's default).
local us = tonumber(os.getenv("DISPA_PERF_SLOWDOWN_US") or "0") or 0
core.register_action("dispa_slowdown", { "http-req" }, function(txn)
    if us > 0 then
        local s = os.clock()
        while (os.clock() - s) * 1e6 < us do end
    end
end)
